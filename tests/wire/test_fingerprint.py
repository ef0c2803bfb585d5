"""Compute descriptors and output comparison: an honest recomputation in the node's own precision (another KV-cache
order) matches within the calibrated tolerance; corruption of any kind, anywhere in the output, doesn't."""

import pytest
import torch

from nectar.wire.fingerprints import ComputeSpec, fingerprint_hash, output_deviation, outputs_match


class TinyCausalBlock(torch.nn.Module):
    """Enough of a transformer block to reproduce the numerics of KV-cached steps vs a full causal forward."""

    def __init__(self, hidden=64, heads=4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(), torch.nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x, past=None):
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        offset = k.shape[2] - t
        mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(offset)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(x), (k, v)


def steps_vs_full(dtype, seed):
    torch.manual_seed(seed)
    block = TinyCausalBlock().to(dtype)
    x = torch.randn(2, 12, 64, dtype=dtype) * 3
    with torch.no_grad():
        out, past = block(x[:, :8])
        stepped = [out]
        for i in range(8, 12):
            out, past = block(x[:, i : i + 1], past)
            stepped.append(out)
        full, _ = block(x)
    return stepped, full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_cached_steps_match_full_recompute_in_the_same_precision(dtype):
    spec = ComputeSpec.of(dtype)
    mismatches = 0
    for seed in range(20):
        stepped, full = steps_vs_full(dtype, seed)
        pos = 0
        for out in stepped:
            mismatches += not outputs_match(out, full[:, pos : pos + out.shape[1]], spec, 1)
            pos += out.shape[1]
    assert mismatches == 0


def cheats(out: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = out.float()
    m = x.abs().mean()
    top = x.abs().topk(4, dim=-1).indices
    rest = x + 0.05 * m * torch.randn(x.shape, generator=g)
    one_token = x.clone()
    one_token[0, 3] = torch.randn(x.shape[-1], generator=g)
    return {
        "noise 3% of mean |x|": x + 0.03 * m * torch.randn(x.shape, generator=g),
        "top-4 kept, the rest corrupted": rest.scatter(-1, top, x.gather(-1, top)),  # passed the old fingerprint
        "scaled": x * 0.9,
        "one token replaced": one_token,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_corrupted_outputs_do_not_match(dtype):
    spec, missed = ComputeSpec.of(dtype), []
    for seed in range(20):
        stepped, full = steps_vs_full(dtype, seed)
        for name, bad in cheats(stepped[0], seed).items():
            if outputs_match(bad.to(dtype), full[:, :8], spec, 1):
                missed.append(name)
    assert not missed


def test_one_percent_noise_is_caught_where_the_precision_resolves_it():
    for dtype in (torch.float32, torch.float16):
        for seed in range(20):
            stepped, full = steps_vs_full(dtype, seed)
            x = stepped[0].float()
            noisy = x + 0.01 * x.abs().mean() * torch.randn_like(x)
            assert not outputs_match(noisy.to(dtype), full[:, :8], ComputeSpec.of(dtype), 1)


def test_lower_precision_claimed_as_higher_does_not_match():
    for seed in range(10):
        stepped32, full32 = steps_vs_full(torch.float32, seed)
        stepped16, _ = steps_vs_full(torch.bfloat16, seed)
        # computed in bfloat16, sent as float32 under a float32 descriptor: judged at float32's tolerance
        assert not outputs_match(stepped16[0].float(), full32[:, :8], ComputeSpec("float32"), 1)
        assert outputs_match(stepped32[0], full32[:, :8], ComputeSpec("float32"), 1)


def test_output_deviation_edge_cases():
    x = torch.randn(2, 3, 16)
    assert output_deviation(x, x) == 0.0
    assert output_deviation(x, x[:, :2]) == float("inf")  # a shape the receipt did not commit to
    bad = x.clone()
    bad[1, 2, 5] = float("nan")
    assert output_deviation(bad, x) == float("inf")
    assert output_deviation(x[:, :0], x[:, :0]) == 0.0


def test_compute_descriptor_layout():
    spec = ComputeSpec.of(torch.bfloat16, "cuda:0")
    raw = spec.encode()
    assert len(raw) == 8 and raw[:3] == b"NC1"  # 8 bytes per receipt, whatever its token count
    assert ComputeSpec.decode(raw) == spec == ComputeSpec("bfloat16", "none", "cuda")
    assert spec.torch_dtype == torch.bfloat16 and len(fingerprint_hash(raw)) == 32
    assert ComputeSpec.decode(ComputeSpec().encode()) == ComputeSpec("float32", "none", "cpu")
    for broken in (b"", raw[:-1], raw + b"\0", b"NF1" + raw[3:], raw[:3] + b"\x09" + raw[4:], raw[:6] + b"\x01\0"):
        with pytest.raises(ValueError):
            ComputeSpec.decode(broken)
    with pytest.raises(ValueError, match="unknown dtype"):
        ComputeSpec("float8")
    with pytest.raises(ValueError, match="unknown quantization"):
        ComputeSpec("float16", "int4")
