"""Times one decode step's attention on the GPU: a query against keys/values that are views into a preallocated
cache (what the batched path passes) vs contiguous copies, with PyTorch's backend choice vs without cuDNN."""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

heads, dim, max_length = 32, 128, 2048
buffer = torch.randn(2, 1, heads, max_length, dim, device="cuda", dtype=torch.float16)
query = torch.randn(1, 1, heads * dim, device="cuda", dtype=torch.float16).view(1, 1, heads, dim).transpose(1, 2)
no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def timed(keys_values, backends, lengths):
    torch.cuda.synchronize()
    began = time.perf_counter()
    for length in lengths:
        keys, values = keys_values(length)
        if backends is None:
            F.scaled_dot_product_attention(query, keys, values, scale=dim**-0.5)
        else:
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(query, keys, values, scale=dim**-0.5)
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / len(lengths) * 1e6


def views(n):
    return buffer[0, :, :, :n], buffer[1, :, :, :n]


def copies(n):
    return buffer[0, :, :, :n].contiguous(), buffer[1, :, :, :n].contiguous()


for name, kv in [("cache views", views), ("contiguous", copies)]:
    for label, backends in [("default backends", None), ("no cuDNN", no_cudnn)]:
        timed(kv, backends, range(16, 32))  # warm-up
        same = timed(kv, backends, [80] * 64)
        growing = timed(kv, backends, range(81, 145))
        print(f"{name:12s} {label:17s} fixed length {same:8.1f} us/call   growing length {growing:8.1f} us/call")
