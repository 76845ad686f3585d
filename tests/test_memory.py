"""kuaida.model.memory: huge-page allocations are ordinary tensors (zeros, right shape), an inference
model's buffers move into one arena without changing its outputs, and such a model still saves."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kuaida.compress.quantize import quantize
from kuaida.model import load_model, memory
from kuaida.model.fused import fuse
from kuaida.model.save import save_model

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_available() -> bool:
    return memory.enabled() and THP.exists() and "[never]" not in THP.read_text()


@pytest.mark.parametrize("off", [False, True])
def test_huge_zeros_are_zeros(off, monkeypatch):
    if off:
        monkeypatch.setenv("KUAIDA_NO_HUGE_PAGES", "1")
    t = memory.huge_zeros((3, 5, 70_000), torch.float16)  # ~2.1 MB: over one huge page
    assert t.shape == (3, 5, 70_000) and t.dtype == torch.float16 and t.is_contiguous()
    assert not t.any()
    t[2, 4, -1] = 1.0  # writable to its last element
    assert t.sum() == 1.0
    raw, advised = memory.huge_empty(5 << 20)
    assert raw.numel() == 5 << 20 and raw.dtype == torch.uint8
    assert advised == (not off and thp_available())
    assert memory.huge_empty(1000)[1] is False  # under one huge page: plain memory


def test_kv_cache_rows_start_zero():
    from kuaida.model.kv_cache import KVCache

    cache = KVCache(2, 4, 3, 4096, 64, dtype=torch.float16)
    assert all(not t.any() and t.shape == (4, 3, 4096, 64) for t in cache.k + cache.v)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@torch.no_grad()
def test_buffers_on_huge_pages_keep_outputs_and_save(dtype, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "HUGE_PAGE", 4096)  # the tiny model's buffers are far under 2 MiB
    src = load_model(str(tiny_llama_dir))
    model = fuse(quantize(src.model, dtype))
    x = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    expect = model(x)
    names = [name for name, _ in model.named_buffers()]
    memory.buffers_on_huge_pages(model)
    assert [name for name, _ in model.named_buffers()] == names
    storages = {t.untyped_storage().data_ptr() for _, t in model.named_buffers()}
    assert len(storages) == 1  # one arena
    assert torch.equal(model(x), expect)
    out = save_model(model, src.tokenizer, tmp_path / "out")  # shared storage is copied out for safetensors
    assert torch.equal(fuse(load_model(str(out)).model)(x), expect)
