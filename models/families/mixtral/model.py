"""The Mixtral family: ``MixtralDecoderLayer`` blocks through the Llama family's code, experts read per expert."""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig

from nectar.models.checkpoint import Checkpoint
from nectar.models.families.llama.model import LlamaFamily

logger = logging.getLogger(__name__)

# transformers' block state dict -> the checkpoint layout (as Mixtral checkpoints ship and save_pretrained writes)
GATE_UP, DOWN, ROUTER = "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"
EXPERT_KEY = "block_sparse_moe.experts.{expert}.{matrix}.weight"
ROUTER_KEY = "block_sparse_moe.gate.weight"


class MixtralFamily(LlamaFamily):
    """MixtralDecoderLayer blocks (router + experts), MixtralRMSNorm head; ``config.sliding_window`` if set."""

    name = "mixtral"
    model_types = ("mixtral",)
    class_prefix = "Mixtral"

    def prepare_config(self, config: PretrainedConfig) -> None:
        super().prepare_config(config)
        if config._experts_implementation is None:
            # what transformers' own model picks by default, so blocks compute as it does (unset, the experts
            # module warns and loops over experts)
            config._experts_implementation = "grouped_mm"

    def sliding_window(self, config: PretrainedConfig) -> int | None:
        return getattr(config, "sliding_window", None)

    def load_block_tensors(
        self, checkpoint: Checkpoint, prefix: str, names: list[str], *, dtype: torch.dtype, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """Experts stacked from per-expert matrices where the checkpoint stores them so: ``gate_up_proj[e]`` is
        ``[w1; w3]`` of expert e (gate rows first, as transformers' loader concatenates them), ``down_proj[e]`` its
        ``w2``; the router's ``gate`` is stored under ``block_sparse_moe``."""
        experts = range(self._num_experts(checkpoint, prefix))
        if GATE_UP not in names or prefix + GATE_UP in checkpoint or not experts:
            # already in transformers' layout (or missing: the default names what is)
            return super().load_block_tensors(checkpoint, prefix, names, dtype=dtype, device=device)
        sources = {
            matrix: [prefix + EXPERT_KEY.format(expert=expert, matrix=matrix) for expert in experts]
            for matrix in ("w1", "w2", "w3")
        }
        plain = [name for name in names if name not in (GATE_UP, DOWN, ROUTER)]
        tensors = super().load_block_tensors(checkpoint, prefix, plain, dtype=dtype, device=device)
        keys = [key for matrices in sources.values() for key in matrices] + [prefix + ROUTER_KEY]
        stored = super().load_block_tensors(checkpoint, "", keys, dtype=dtype, device=device)

        def stack(matrix: str) -> torch.Tensor:
            return torch.stack([stored.pop(key) for key in sources[matrix]])

        tensors[GATE_UP] = torch.cat([stack("w1"), stack("w3")], dim=1)  # [experts, 2 * intermediate, hidden]
        tensors[DOWN] = stack("w2")  # [experts, hidden, intermediate]
        tensors[ROUTER] = stored.pop(prefix + ROUTER_KEY)
        return tensors

    @staticmethod
    def _num_experts(checkpoint: Checkpoint, prefix: str) -> int:
        expert = 0
        while prefix + EXPERT_KEY.format(expert=expert, matrix="w1") in checkpoint:
            expert += 1
        return expert
