"""``ClientHead``: what a client keeps locally (embeddings, final norm, LM head), loaded without any block."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import PretrainedConfig

from nectar.models.checkpoint import Checkpoint
from nectar.models.cpu_blas import CpuMatmul
from nectar.models.errors import CheckpointError
from nectar.models.family import HeadModules
from nectar.models.greedy_head import LowPrecisionArgmax, choose_greedy_argmax
from nectar.models.layout import store_in_out
from nectar.models.registry import get_family

logger = logging.getLogger(__name__)

SMALL_IDS = 64  # ids checked in Python below this many (a tensor op costs more than the loop)
HEAD_ROWS = (1, 2, 4, 8, 16)  # a client's logits: one row per sequence in decode (more rows: PyTorch's BLAS)


class ClientHead(nn.Module):
    """Turns token ids into the first block's input and the last block's output into logits; used by the client.

    Build with ``load_client_head``. Weights are frozen; gradients still flow through ``embed``/``logits`` inputs.
    """

    def __init__(self, *, config: PretrainedConfig, modules: HeadModules):
        super().__init__()
        self.config = config
        self.word_embeddings = modules.word_embeddings
        self.embed_norm = modules.embed_norm
        self.final_norm = modules.final_norm
        self.lm_head = modules.lm_head
        self.embed_scale = modules.embed_scale
        self.logit_softcap = modules.logit_softcap
        self.matmul = CpuMatmul()  # ``load_client_head`` calibrates it on CPU
        self.greedy_argmax: LowPrecisionArgmax | None = None  # ``load_client_head`` sets it where it is faster
        self.requires_grad_(False)

    @property
    def embedding_dim(self) -> int:
        return self.word_embeddings.embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids -> ``[B, T, H]`` input of block 0."""
        if input_ids.numel():  # checked where the ids are (on CPU when decoding): no device sync per token
            if input_ids.numel() <= SMALL_IDS and input_ids.device.type == "cpu":
                ids = input_ids.reshape(-1).tolist()  # a decode step's few ids: 3 us less than aminmax
                low, high = int(min(ids)), int(max(ids))
            else:
                low, high = (int(bound) for bound in torch.aminmax(input_ids))
            if low < 0 or high >= self.word_embeddings.num_embeddings:
                raise ValueError(f"token ids must be in [0, {self.word_embeddings.num_embeddings}), got {low}..{high}")
        hidden_states = self.word_embeddings(input_ids.to(self.device))
        if self.embed_scale is not None:  # rounded to the weights' dtype first, as transformers does
            hidden_states = hidden_states * torch.tensor(self.embed_scale, dtype=hidden_states.dtype)
        return self.embed_norm(hidden_states) if self.embed_norm is not None else hidden_states

    def norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The final norm alone (the model's last hidden state as transformers reports it)."""
        return self.final_norm(hidden_states.to(device=self.device, dtype=self.dtype))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` output of the last block -> ``[B, T, vocab]`` logits."""
        normed = self.norm(hidden_states)
        in_out = self.lm_head.weight.t()
        if in_out.is_contiguous() and not (torch.is_grad_enabled() and normed.requires_grad):
            rows = normed.reshape(-1, normed.shape[-1])  # stored [in, out] on CPU: through the faster BLAS
            return self.soft_cap(self._float32_logits(rows).view(*normed.shape[:-1], -1))
        return self.soft_cap(self.lm_head(normed))

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's final soft-capping of raw logits (Gemma 2's ``cap * tanh(logits / cap)``), else them."""
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` output of the last block -> ``[B]`` ids of the largest logits at the last position (greedy
        decoding's choice); one row goes through ``greedy_argmax`` where the client chose it at load."""
        if self.greedy_argmax is not None and hidden_states.shape[0] == 1 and not torch.is_grad_enabled():
            return self.greedy_argmax(self.norm(hidden_states[:, -1]), full_logits=self._float32_logits)
        return self.logits(hidden_states[:, -1:])[:, -1].argmax(dim=-1)

    def _float32_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, H] normed rows -> [N, vocab], with the head stored [in, out] (on CPU, see ``load_client_head``)."""
        return self.matmul(rows, self.lm_head.weight.t(), self.lm_head.bias)


def load_client_head(
    path_or_name: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> ClientHead:
    """Load embeddings, final norm and LM head of a model (built-in name or checkpoint folder), no blocks."""
    from nectar.models.resolve import load_config, resolve_model

    path = resolve_model(path_or_name)
    config = load_config(path)
    family = get_family(config)
    family.prepare_config(config)
    checkpoint = Checkpoint(path)
    with torch.device("meta"):
        modules = family.build_head(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    chosen: dict[str, str] = {}
    for name, candidates in modules.sources.items():
        if name == "lm_head.weight" and tied:
            continue  # tied checkpoints often omit it; transformers ties it to the embeddings either way
        key = checkpoint.first_present(candidates)
        if key is None:
            raise CheckpointError(f"{checkpoint.path} has no tensor for {name} (looked for {', '.join(candidates)})")
        chosen[name] = key
    tensors = checkpoint.load(list(chosen.values()), dtype=dtype, device=device)
    state = {name: tensors[key] for name, key in chosen.items()}
    if tied:
        state["lm_head.weight"] = state["word_embeddings.weight"]
    head = ClientHead(config=config, modules=modules)
    head.load_state_dict(state, strict=True, assign=True)
    if tied:
        head.lm_head.weight = head.word_embeddings.weight  # one Parameter, as transformers ties them
    head.requires_grad_(False)
    head = head.to(device).eval()
    if head.device.type == "cpu":  # decode's one row times the head, a client's largest read, is faster [in, out]
        matrix = store_in_out(head.lm_head)
        if tied:
            head.word_embeddings.weight = head.lm_head.weight  # a strided lookup of a few rows costs microseconds
        head.matmul = CpuMatmul.calibrate([matrix], rows=HEAD_ROWS)
        if head.logit_softcap is None:  # capped logits may tie where the raw ones the check ranks do not
            head.greedy_argmax = choose_greedy_argmax(
                matrix, head.lm_head.bias, full_logits=head._float32_logits, final_norm=head.final_norm
            )
    logger.info("Loaded client head of %s (%s, tied=%s)", path, dtype, tied)
    return head
