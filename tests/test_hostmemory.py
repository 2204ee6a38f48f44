"""spap.hostmemory: the heap's free pages go back to the system (glibc on Linux)."""

from __future__ import annotations

import ctypes
import gc
import os
import sys

import pytest

from spap.hostmemory import _malloc_trim, release_free_memory


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc's malloc_trim")
def test_freed_heap_chunks_stop_counting_as_resident():
    """Every other one of 1,000 chunks of 96 KiB (below glibc's mmap threshold, so they come from the
    heap) is freed: the holes stay resident until release_free_memory returns them."""
    gc.collect()
    release_free_memory()
    size = 96 * 1024
    chunks = [ctypes.create_string_buffer(size) for _ in range(1000)]  # zero-filled: every page resident
    del chunks[::2]
    gc.collect()
    before = _resident_bytes()
    assert release_free_memory()
    freed = before - _resident_bytes()
    assert freed > 0.5 * 500 * size, f"only {freed / 2**20:.1f} MiB of the 46.9 MiB freed went back"
    assert all(c.raw[:1] == b"\0" for c in chunks)  # the live chunks are untouched


def test_release_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    _malloc_trim.cache_clear()
    try:
        assert release_free_memory() is False
    finally:
        monkeypatch.undo()
        _malloc_trim.cache_clear()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_host_memory_benchmark_charges_every_block():
    """benchmarks/host_memory.py on SmolLM2 (4 windows of 256 tokens): both processes report every block,
    and no sample exceeds the process's own peak."""
    from tests.helpers import benchmark_module

    rows = benchmark_module("host_memory").main(["--windows", "4", "--seqlen", "256", "--target", "dense",
                                                 "--parallel"])
    assert [r["config"] for r in rows] == ["released", "kept"]
    for r in rows:
        assert {str(i) for i in range(30)} <= set(r["per_block"])
        assert all(0 < v <= r["peak_rss_gib"] + 0.01 for v in r["per_block"].values())


@pytest.mark.parametrize("target, passes", [("pruned", 1), ("dense", 2)])
def test_the_cpu_prune_releases_before_each_pass_of_each_batch(monkeypatch, target, passes):
    """On the CPU the prune returns the heap's free pages before every pass of a batch through a block
    (each stream's), after each block, and not only between blocks."""
    import torch
    import transformers

    import spap
    import spap.pipeline

    calls = []
    monkeypatch.setattr(spap.pipeline, "release_free_memory", lambda: calls.append(1) or True)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=128, num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    spap.prune_layerwise(model, ids, 0.25, batch_size=2, target=target, output_metric=None, progress=False)
    batches, blocks = 3, 2
    assert len(calls) == blocks * (batches * passes + 1)
