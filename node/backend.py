"""The span a node hosts: one ``BlockSpan`` per block, so a request may use any contiguous sub-span.

Pure compute, called on the compute thread only (see ``task_pool``); shapes are validated by the handler first.

``InferenceTask`` is what the handler submits for one session's step; the compute thread gathers the tasks that are
pending at once and hands each group to ``SpanBackend.run_inference``, which runs them through the model family's
fast path (``ModelFamily.batch_runner``: several sessions' tokens in one forward, decode rounds replayed as CUDA
graphs on GPUs, ``graphs``) or, for a family without one, through ``BlockSpan.forward`` one session at a time. With
a page size (``kv_page_size``), one-sequence sessions keep their keys/values in one page pool (``nectar.models.paged``)
and their decode rounds go through ``PagedDecoder``, whose recordings serve any sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nectar.models import load_config, load_span
from nectar.models.adapters import load_span_adapters
from nectar.models.fast_path import BatchRunner, SpanStep
from nectar.models.paged import PagePool
from nectar.node.graphs import GraphedDecoder, PagedDecoder
from nectar.node.task_pool import announce_round_started
from nectar.node.training_cache import TrainingGraphCache
from nectar.settings import current
from nectar.wire.protocol import MAX_ADAPTERS

logger = logging.getLogger(__name__)


class InferenceTask(SpanStep):
    """One session's step, as the handler submits it (a ``SpanStep`` of ``backend``'s blocks).

    Callable on its own (an unbatched step); the compute thread batches tasks whose ``batch_key`` is equal.
    """

    def __init__(
        self,
        backend: SpanBackend,
        hidden: torch.Tensor,
        caches: list,
        start: int,
        end: int,
        position: int,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ):
        super().__init__(hidden, caches, start, end, position, prompts)
        self.backend = backend
        self.adapter = adapter  # a LoRA adapter the backend serves, or None

    @property
    def session(self) -> int:
        return id(self.caches[0])

    @property
    def batch_key(self) -> tuple | None:
        """Tasks with equal keys may share a forward; None = run alone (deep prompts on the first step)."""
        if not self.batchable:
            return None
        return id(self.backend), self.start, self.end, self.adapter

    @property
    def announces_start(self) -> bool:
        """On an accelerator the backend says when the round's kernels are queued (``announce_round_started``)."""
        return self.backend.device.type != "cpu"

    def __call__(self) -> torch.Tensor:
        return self.backend.run_inference([self])[0]

    @staticmethod
    def run_batch(tasks: Sequence[InferenceTask]) -> list[torch.Tensor]:
        return tasks[0].backend.run_inference(tasks)


class SpanBackend:
    """Holds blocks [start, end) of a model and runs inference steps, forward and backward through sub-spans.

    :param batching: run inference steps through the family's ``batch_runner`` where it has one (else one by one)
    :param page_size: > 0: keep one-sequence sessions' keys/values in a page pool of ``cache_bytes`` (pages of this
        many tokens) and run their decode rounds through ``PagedDecoder``, where the runner has a paged step;
        0: each session its own ``SpanCache`` (rounds recorded per composition of sessions, ``GraphedDecoder``)
    :param cache_bytes: the node's KV-cache budget: the page pool's size (allocated at load) when ``page_size`` > 0
    :param training_cache_bytes: activations kept between a forward and its backward (``TrainingGraphCache``)
    """

    def __init__(
        self,
        model_path: Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype,
        device: str,
        quantization: str = "none",
        show_progress=True,
        batching: bool = True,
        page_size: int = 0,
        cache_bytes: int = 0,
        training_cache_bytes: int = 1024**3,
        adapters: Sequence[str | Path] = (),
        base_names: set[str] = frozenset(),
    ):
        self.model_path, self.start, self.end = Path(model_path), start, end
        self.dtype, self.device, self.quantization = dtype, torch.device(device), quantization
        self.config = load_config(model_path)
        began = time.perf_counter()
        self.blocks = [
            load_span(model_path, index, index + 1, dtype=dtype, device=device, quantization=quantization)
            for index in tqdm(range(start, end), desc=f"Loading blocks {start}:{end}", disable=not show_progress)
        ]
        for block in self.blocks:
            block.requires_grad_(False)
            block.eval()
        self.hidden_size = self.blocks[0].hidden_size
        family = self.blocks[0].family
        # LoRA adapters hooked on the blocks' Linear layers, applied only inside ``adapters.use(name)``
        self.adapters = load_span_adapters(
            self.blocks, list(adapters), base_names=base_names, max_adapters=MAX_ADAPTERS
        )
        if self.adapters.names:
            logger.info(f"Serving LoRA adapters {', '.join(self.adapters.names)} on blocks {start}:{end}")
        self.batch_runner: BatchRunner | None = family.batch_runner(self.blocks) if batching else None
        # recorded decode rounds on GPUs (the runner's static step); eager rounds elsewhere
        self.decode_graphs: GraphedDecoder | None = None
        if self.batch_runner is not None and self.device.type == "cuda" and current().cuda_graphs:
            self.decode_graphs = GraphedDecoder(self.batch_runner)
        self.pages: PagePool | None = None
        self.paged: PagedDecoder | None = None
        if page_size > 0 and self.batch_runner is not None and getattr(self.batch_runner, "pages", False):
            layout = self.blocks[0].kv_layout
            page_bytes = PagePool.page_bytes_for(end - start, page_size, layout.num_heads, layout.head_dim, dtype)
            # + the scratch page, so the budget's worth of pages serve sessions (MemoryCache counts those)
            self.pages = PagePool(
                num_blocks=end - start,
                num_pages=cache_bytes // page_bytes + 1,
                page_size=page_size,
                num_heads=layout.num_heads,
                head_dim=layout.head_dim,
                dtype=dtype,
                device=self.device,
            )
            self.paged = PagedDecoder(self.batch_runner, self.pages, capture=self.device.type == "cuda")
        self.graphs = TrainingGraphCache(max_bytes=training_cache_bytes)
        self.max_runner_batch = 0  # most sessions' steps in one forward of ``batch_runner`` (node info's counters)
        weights = "" if quantization == "none" else f", {quantization} weights"
        logger.info(f"Loaded blocks {start}:{end} in {time.perf_counter() - began:.2f}s ({dtype}, {device}{weights})")
        logger.info(f"Inference steps of {family.name} blocks: {self._describe_path(batching)}")

    def _describe_path(self, batching: bool) -> str:
        if self.batch_runner is None:
            why = "batching is off" if not batching else self.blocks[0].family.generic_path_reason(self.blocks)
            return f"generic path, one session at a time through BlockSpan.forward ({why})"
        graphs = self.decode_graphs
        recorded = ", decode rounds recorded as CUDA graphs" if graphs is not None and graphs.enabled else ""
        if self.pages is not None:
            recorded += (
                f", one-sequence sessions in a pool of {self.pages.capacity} pages of {self.pages.page_size} tokens"
                + (" (decode rounds recorded per row count, any sessions)" if self.paged.capture else "")
            )
        return f"{self.batch_runner.describe()}{recorded}"

    def _local(self, start: int, end: int) -> list:
        return self.blocks[start - self.start : end - self.start]

    def cache_bytes_per_token(self, start: int, end: int, batch_size: int = 1) -> int:
        return sum(block.cache_bytes_per_token(batch_size) for block in self._local(start, end))

    def _paged(self, batch_size: int, max_length: int) -> bool:
        """Whether a session of this shape keeps its keys/values in the page pool."""
        return self.pages is not None and batch_size == 1 and max_length <= self.paged.max_positions

    def session_cache_bytes(self, start: int, end: int, batch_size: int, max_length: int) -> int:
        """What a session reserves of the node's KV-cache budget (``MemoryCache``): its own cache's bytes, or, in
        the page pool, its whole pages across every block of the pool (a sub-span's session holds a page of each)."""
        if self._paged(batch_size, max_length):
            return self.pages.reservation_bytes(max_length)
        return self.cache_bytes_per_token(start, end, batch_size) * max_length

    def new_caches(self, start: int, end: int, batch_size: int, max_length: int) -> list:
        """One cache per block; in the page pool where it applies (CacheError when the pool is full)."""
        if self._paged(batch_size, max_length):
            return self.pages.open(max_length, start - self.start, end - start)
        return [block.new_cache(batch_size, max_length) for block in self._local(start, end)]

    def _run_blocks(
        self, hidden: torch.Tensor, start: int, end: int, caches=None, prompts=None, adapter: str | None = None
    ) -> torch.Tensor:
        hidden = hidden.to(self.device, self.dtype)
        with self.adapters.use(adapter):
            for i, block in enumerate(self._local(start, end)):
                block_prompts = prompts[i : i + 1].to(self.device, self.dtype) if prompts is not None else None
                hidden = block(hidden, cache=caches[i] if caches is not None else None, prompts=block_prompts)
        return hidden

    def inference_task(
        self, hidden, caches, *, start: int, end: int, position: int, prompts=None, adapter: str | None = None
    ) -> InferenceTask:
        """One session's step, for the compute thread to batch with other sessions' steps (of the same adapter)."""
        return InferenceTask(self, hidden, caches, start, end, position, prompts, adapter)

    def inference_step(
        self, hidden, caches, *, start: int, end: int, position: int, prompts=None, adapter: str | None = None
    ) -> torch.Tensor:
        return self.run_inference(
            [
                self.inference_task(
                    hidden, caches, start=start, end=end, position=position, prompts=prompts, adapter=adapter
                )
            ]
        )[0]

    def run_inference(self, tasks) -> list[torch.Tensor]:
        """Steps of one or more sessions through the same blocks; returns each one's output on the CPU."""
        with torch.inference_mode():
            for task in tasks:
                for cache in task.caches:
                    if cache.length > task.position:
                        cache.crop(task.position)  # the client rolled back (retry or replay): forget what follows
            # the fused runner reads the base weights only: steps with an adapter take the generic path, each under
            # its own adapter
            if self.batch_runner is not None and all(t.batch_key is not None and t.adapter is None for t in tasks):
                outputs = self._run_batched(tasks, tasks[0].start - self.start)
            else:
                outputs = [
                    self._run_blocks(
                        task.hidden,
                        task.start,
                        task.end,
                        task.caches,
                        task.prompts if task.position == 0 else None,
                        getattr(task, "adapter", None),
                    )
                    for task in tasks
                ]
            announce_round_started()  # the kernels are queued: the copy below waits for them
            if len(outputs) > 1 and self.device.type != "cpu":  # one device-to-host copy (and sync) per round
                rows = torch.cat([output.reshape(-1, self.hidden_size) for output in outputs]).cpu()
                return [
                    chunk.view(output.shape)
                    for chunk, output in zip(
                        rows.split([output.shape[0] * output.shape[1] for output in outputs]), outputs
                    )
                ]
            return [output.cpu() for output in outputs]

    def _run_batched(self, tasks, first_block: int) -> list[torch.Tensor]:
        """Through the family's runner: a recorded round where one applies (``GraphedDecoder``), else eagerly."""
        self.max_runner_batch = max(self.max_runner_batch, len(tasks))
        if self.paged is not None and self.paged.applies(tasks):
            try:
                return self.paged.run(tasks, first_block)
            except Exception:
                if not self.paged.capture:
                    raise
                # rerunning is safe: lengths advance only after a round, and rewriting a slot is idempotent
                logger.warning("Paged CUDA graph decode failed; continuing with the paged step eagerly", exc_info=True)
                self.paged.capture = False
                self.paged._graphs.clear()
                return self.paged.run(tasks, first_block)
        graphs = self.decode_graphs
        if graphs is not None and graphs.applies(tasks):
            try:
                outputs = graphs.run(tasks, first_block)
            except Exception:
                logger.warning("CUDA graph decode failed; continuing without graphs", exc_info=True)
                self.decode_graphs, outputs = None, None
            if outputs is not None:
                return outputs
        outputs = self.batch_runner.run(tasks, first_block)
        if self.decode_graphs is not None:
            self.decode_graphs.note_sessions(tasks, first_block)
        return outputs

    def forward(
        self, hidden, *, start: int, end: int, prompts=None, keep_graph: bool = True, adapter: str | None = None
    ) -> torch.Tensor:
        """A stateless forward. Its autograd graph is kept for a while, so the backward that usually follows (same
        inputs) skips the recomputation (``TrainingGraphCache``); a caller that will not call backward (request
        metadata ``"backward": false``) gets a plain inference forward instead, without the kept activations' cost."""
        if not keep_graph:
            with torch.inference_mode():
                return self._run_blocks(hidden, start, end, None, prompts, adapter).cpu()
        with torch.enable_grad():
            inputs = self._grad_inputs(hidden, prompts)
            output = self._run_blocks(inputs[0], start, end, None, inputs[1] if len(inputs) > 1 else None, adapter)
        self.graphs.put(
            key=(start, end, adapter),  # another adapter's graph is another function of the same inputs
            hidden=hidden,
            prompts=prompts,
            inputs=inputs,
            output=output,
            nbytes=self._activation_bytes(hidden, start, end),
        )
        return output.detach().cpu()

    def backward(self, hidden, grad_output, *, start: int, end: int, prompts=None, adapter: str | None = None):
        """Returns (grad wrt hidden, grad wrt prompts or None); reuses the forward's graph when it is still kept."""
        kept = self.graphs.pop(key=(start, end, adapter), hidden=hidden, prompts=prompts)
        with torch.enable_grad():
            if kept is not None:
                inputs, output = kept
            else:
                inputs = self._grad_inputs(hidden, prompts)
                output = self._run_blocks(inputs[0], start, end, None, inputs[1] if len(inputs) > 1 else None, adapter)
            grads = torch.autograd.grad(output, inputs, grad_outputs=grad_output.to(output.device, output.dtype))
        return grads[0].cpu(), (grads[1].cpu() if prompts is not None else None)

    def _activation_bytes(self, hidden: torch.Tensor, start: int, end: int) -> int:
        """What autograd keeps for a forward of ``hidden`` (an upper estimate: counting with saved-tensor hooks cost
        a quarter of the forward's time). Per token and block: ~12 hidden-sized and ~5 MLP-sized tensors, plus the
        attention probabilities of the math kernel."""
        batch, tokens = hidden.shape[:2]
        config = self.config
        intermediate = getattr(config, "intermediate_size", None) or 4 * self.hidden_size
        heads = getattr(config, "num_attention_heads", 1)
        per_block = batch * tokens * (12 * self.hidden_size + 5 * intermediate) + batch * heads * tokens * tokens
        return per_block * (end - start) * self.dtype.itemsize

    def _grad_inputs(self, hidden, prompts) -> list[torch.Tensor]:
        inputs = [hidden.to(self.device, self.dtype).detach().requires_grad_(True)]
        if prompts is not None:
            inputs.append(prompts.to(self.device, self.dtype).detach().requires_grad_(True))
        return inputs

    def measure(self, *, steps: int = 8, prefill_tokens: int = 64) -> tuple[float, float]:
        """Returns (decode steps/s, forward tokens/s) through the whole span."""
        start, end = self.start, self.end
        hidden_one = torch.randn(1, 1, self.hidden_size) * 0.1
        caches = self.new_caches(start, end, 1, steps + 2)
        self.inference_step(hidden_one, caches, start=start, end=end, position=0)  # warm-up
        began = time.perf_counter()
        for i in range(steps):
            self.inference_step(hidden_one, caches, start=start, end=end, position=i + 1)
        inference_rps = steps / (time.perf_counter() - began)
        hidden_many = torch.randn(1, prefill_tokens, self.hidden_size) * 0.1
        self.forward(hidden_many, start=start, end=end)
        began = time.perf_counter()
        self.forward(hidden_many, start=start, end=end)
        forward_rps = prefill_tokens / (time.perf_counter() - began)
        return inference_rps, forward_rps
