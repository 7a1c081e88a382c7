"""The Triton backend's KV store (one launch per layer) == KVPool.write (two index_put).

Runs under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET there) and
compiled on a GPU. k and v come as strided views of one merged qkv tensor, as the fused
model hands them over.
"""
import pytest
import torch

from stage2_runner.kv_cache import KVPool
from stage2_runner.triton_kernels import store_kv

pytestmark = pytest.mark.stage2
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kvh,d,dtype", [(2, 16, torch.float32), (3, 8, torch.float32), (8, 128, torch.float16)])
def test_store_kv_equals_pool_write(device, kvh, d, dtype):
    T, H = 7, 2 * kvh
    g = torch.Generator().manual_seed(kvh * d)
    qkv = torch.randn(T, (H + 2 * kvh) * d, generator=g).to(device)     # fp32 source, pool casts
    k = qkv[:, H * d:(H + kvh) * d].view(T, kvh, d)
    v = qkv[:, (H + kvh) * d:].view(T, kvh, d)
    loc = torch.randperm(40, generator=g)[:T].to(device)
    ref = KVPool(1, 40, kvh, d, dtype, device)
    ours = KVPool(1, 40, kvh, d, dtype, device)
    ref.write(0, loc, k, v)
    store_kv(k, v, ours.k_buffers[0], ours.v_buffers[0], loc)
    assert torch.equal(ours.k_buffers[0], ref.k_buffers[0]) and torch.equal(ours.v_buffers[0], ref.v_buffers[0])
    assert ours.k_buffers[0].abs().sum() > 0                                # something was written
