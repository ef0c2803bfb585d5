"""Activation fingerprints: honest recomputation (different batching/KV-cache order) matches, corruption doesn't."""

import pytest
import torch

from nectar.wire.fingerprints import activation_fingerprint, fingerprint_hash, fingerprints_match, parse_fingerprint


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
def test_kv_cached_steps_match_full_recompute(dtype):
    mismatches = 0
    for seed in range(20):
        stepped, full = steps_vs_full(dtype, seed)
        pos = 0
        for out in stepped:
            mismatches += not fingerprints_match(
                activation_fingerprint(out), activation_fingerprint(full[:, pos : pos + out.shape[1]]), dtype=dtype
            )
            pos += out.shape[1]
    assert mismatches == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_corrupted_outputs_do_not_match(dtype):
    caught = 0
    for seed in range(20):
        stepped, full = steps_vs_full(dtype, seed)
        out = stepped[0]
        # three kinds of cheating: noise, skipping the block (identity-ish), zeros on one token
        noisy = out + 0.05 * out.abs().amax() * torch.randn_like(out)
        lazy = out * 0.9
        one_token = out.clone()
        one_token[0, 3] = torch.randn_like(one_token[0, 3])
        for bad in (noisy, lazy, one_token):
            caught += not fingerprints_match(
                activation_fingerprint(bad), activation_fingerprint(full[:, :8]), dtype=dtype
            )
    assert caught == 60


def test_fingerprint_layout_and_size():
    t = torch.randn(3, 7, 128)
    fp = activation_fingerprint(t, k=4)
    assert len(fp) == 8 + 3 * 7 * 16  # 16 bytes per token plus an 8-byte header
    indices, values = parse_fingerprint(fp)
    assert indices.shape == values.shape == (21, 4)
    flat = t.reshape(-1, 128)
    assert torch.equal(indices[:, 0], flat.abs().argmax(-1))
    assert torch.allclose(values[:, 0], flat.gather(-1, indices[:, :1]).squeeze(-1), rtol=1e-3)
    assert len(fingerprint_hash(fp)) == 32
    assert not fingerprints_match(fp, fp[:-1], dtype=torch.float32)
    assert not fingerprints_match(fp, activation_fingerprint(t[:, :6]), dtype=torch.float32)
    with pytest.raises(ValueError, match="batch, tokens, hidden"):
        activation_fingerprint(t[0])
