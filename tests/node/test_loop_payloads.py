"""The event loop's numpy shortcuts for a step's tensors (audit records, the signing process's jobs) keep the bytes,
dtype and shape the torch path gave, whatever the tensor's dtype, strides or grad flag."""

from __future__ import annotations

import pytest
import torch

from nectar.node.audit import AuditLog
from nectar.node.signing import _raw, _unpacked


def _tensors() -> list[torch.Tensor]:
    base = torch.randn(2, 3, 8)
    return [
        base,
        base.transpose(0, 1),  # not contiguous
        base.to(torch.float16),
        base.to(torch.float64),
        base.to(torch.bfloat16),  # no numpy dtype: the torch path
        base.clone().requires_grad_(True),
    ]


@pytest.mark.parametrize("index", range(6))
def test_signing_jobs_carry_the_same_tensor(index):
    tensor = _tensors()[index]
    back = _unpacked(_raw(tensor))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor.detach())


@pytest.mark.parametrize("index", range(6))
def test_audit_records_keep_the_same_tensor(tmp_path, index):
    tensor = _tensors()[index]
    log = AuditLog(folder=tmp_path, max_bytes=1 << 24, retention_s=60.0, max_disk_bytes=1 << 26)
    log.record(b"s" * 32, 0, 0, tensor, 0, 4, outputs=tensor * 2).result()
    log.close()
    reloaded = AuditLog(folder=tmp_path, max_bytes=1 << 24, retention_s=60.0, max_disk_bytes=1 << 26)
    inputs, span, _, outputs = reloaded.history(b"s" * 32, 0)
    assert span == (0, 4)
    assert inputs.dtype == tensor.dtype and torch.equal(inputs, tensor.detach())
    assert torch.equal(outputs, (tensor * 2).detach())
    reloaded.close()
