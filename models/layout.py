"""Weights stored [in, out] in memory while their modules keep PyTorch's usual [out, in] view.

CPU BLAS multiplies a few rows by a large matrix faster in this layout; the module still sees an [out, in] weight,
so autograd, ``state_dict`` and checks work unchanged, and no memory is duplicated. Measured on a 2-core AMD EPYC VM
(``benchmarks/roofline.py`` prints both layouts): one row times an LM head 1.1-2.6x as fast (32000x512 5.5 -> 2.1 ms,
49152x576 9.5 -> 5.6 ms, 32000x2048 13.3 -> 11.7 ms), 4 to 16 rows 0.8-1.4x; on an Intel Xeon VM, the small batches
of a node's batched rounds 1.3-1.6x, single rows as fast.
"""

from __future__ import annotations

import torch
from torch import nn


def store_in_out(linear: nn.Linear) -> torch.Tensor:
    """Re-lays ``linear``'s weight as a contiguous [in, out] matrix and returns it (``x @ matrix`` is the product);
    the module's weight becomes a frozen [out, in] view of it."""
    with torch.no_grad():
        matrix = linear.weight.detach().t().contiguous()
    linear.weight = nn.Parameter(matrix.t(), requires_grad=False)
    return matrix
