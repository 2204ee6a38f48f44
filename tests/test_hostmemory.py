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
