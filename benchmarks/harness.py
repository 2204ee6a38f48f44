"""What the model-level benchmarks share: evaluation protocols, the cache of finished runs, one run per process.

``end_to_end.py``, ``ddp_run.py``, ``leap_run.py`` and ``global_methods.py`` evaluate pruned models the
same way (:data:`PROTOCOLS`), can share one JSON cache file (keys ``PROTOCOL|STRUCTURE|METHOD|SPARSITY``,
the dense model under ``PROTOCOL|dense``), and run each pruning in a fresh Python process of their own
script (``SCRIPT --worker JSON``) so that its peak RSS is its own.  The scripts import this module as a
sibling (``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

VALIDATION_WINDOWS = 32  # windows of eval_seqlen tokens of the validation split (spap.data.validation_documents)
PROTOCOLS = {
    "quick": {"n": 64, "seqlen": 1024, "eval_seqlen": 1024, "eval_windows": 40},
    "standard": {"n": 128, "seqlen": 2048, "eval_seqlen": 2048, "eval_windows": None},
}


def evaluation_text(protocol: str) -> str:
    """``first 40 windows of 1024 tokens of WikiText-2 test and of C4 docs[500:]`` for ``quick``."""
    p = PROTOCOLS[protocol]
    windows = "all windows" if p["eval_windows"] is None else f"first {p['eval_windows']} windows"
    return (f"{windows} of {p['eval_seqlen']} tokens of WikiText-2 test and of C4 docs[500:]; validation (for "
            f"choosing defaults): the first {VALIDATION_WINDOWS} windows of the C4 docs[:500] the calibration "
            "draw does not use")


def protocol_text(protocol: str) -> str:
    p = PROTOCOLS[protocol]
    return (f"protocol {protocol}: calibration {p['n']}x{p['seqlen']} tokens from C4 docs[:500], seed 0; "
            f"evaluation {evaluation_text(protocol)}")


# ---------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model, tok, protocol: str, seed: int = 0) -> dict:
    """The protocol's evaluation of ``model``: ``{"wikitext_ppl", "c4_ppl", "val_ppl", "eval_s"}``
    (``val_ppl`` on the validation split, the one to choose defaults by: the C4 documents ``[:500]`` that
    the calibration draw with ``seed`` does not use)."""
    from spap.data import c4_documents, validation_documents, wikitext_rows
    from spap.eval import perplexity

    p = PROTOCOLS[protocol]
    options = dict(seqlen=p["eval_seqlen"], max_windows=p["eval_windows"])
    t = time.perf_counter()
    wiki = perplexity(model, tok, wikitext_rows(), **options)
    c4 = perplexity(model, tok, c4_documents(500, None), **options)
    val = perplexity(model, tok, validation_documents(tok, n=p["n"], seqlen=p["seqlen"], seed=seed), seqlen=p["eval_seqlen"],
                     max_windows=VALIDATION_WINDOWS)
    return {"wikitext_ppl": wiki, "c4_ppl": c4, "val_ppl": val, "eval_s": time.perf_counter() - t}


def dense_row(protocol: str, model_source: str, device: str | None, threads: int) -> dict:
    """The unpruned model's row, cached under ``PROTOCOL|dense``."""
    import torch

    import spap
    from spap.report import count_parameters

    torch.set_num_threads(threads)
    model, tok = spap.load_model(model_source, device=device or "cpu")
    scores = evaluate(model, tok, protocol)
    return {"structure": "dense", "method": "dense", "sparsity": 0.0,
            "wikitext_ppl": scores["wikitext_ppl"], "c4_ppl": scores["c4_ppl"], "val_ppl": scores["val_ppl"],
            "params": count_parameters(model), "params_dense": count_parameters(model)}


# ---------------------------------------------------------------------------------------------------
# The cache of finished runs and a subprocess per run


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_result(path: Path, key: str, row: dict) -> dict:
    """Add one finished run to the cache file and return the whole cache.

    The file is re-read under a lock before writing, so two sweeps sharing one cache (say, one per
    CPU core with ``--threads 1``) add to it rather than overwrite each other's runs.
    """
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = load_cache(path)
        cache[key] = row
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: an interrupted write never leaves half a cache
    return cache


def run_in_subprocess(payload: dict, timeout: float | None, *, script: str | Path,
                      stream_stderr: bool = False) -> dict:
    """Run ``script --worker JSON`` in a fresh process, so each run's peak RSS is its own; the worker's
    last stdout line is its result row.  ``stream_stderr`` lets the worker's progress bar through
    instead of keeping its stderr for the error message."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(payload)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if stream_stderr else subprocess.PIPE,
                         text=True, timeout=timeout, cwd=os.getcwd())
    if out.returncode != 0:
        detail = "its error is above" if stream_stderr else f"\n{out.stderr[-3000:]}"
        raise RuntimeError(f"worker failed ({out.returncode}): {detail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_and_cache(cache_path: Path, key: str, payload: dict, *, script: str | Path, timeout: float | None,
                  threads: int | None, device: str | None = None, stream_stderr: bool = False,
                  label: str | None = None) -> tuple[dict, dict] | None:
    """One run of ``script --worker`` in its own process, stamped (wall time, machine, threads, date) and
    saved under ``key``.

    Returns ``(cache, row)``, or None after printing why the run failed (the sweep goes on)."""
    start = time.perf_counter()
    try:
        row = run_in_subprocess(payload, timeout, script=script, stream_stderr=stream_stderr)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"{label or key}: FAILED: {err}", flush=True)
        return None
    row.update(wall_s=time.perf_counter() - start, machine=machine_text(device), threads=threads,
               date=time.strftime("%Y-%m-%d"))
    return save_result(cache_path, key, row), row


def machine_text(device: str | None) -> str:
    import torch

    if device and device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------
# Command line


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, *, at_least: dict[str, float]) -> None:
    """Stop with a usage error, before any work, if a sparsity is outside (0, 1) or an option is too small.

    ``at_least`` maps option names as stored on ``args`` (``batch_size``) to their smallest allowed value.
    """
    bad = [s for s in args.sparsities if not 0 < s < 1]
    if bad:
        parser.error(f"--sparsities must be in (0, 1); got {bad}")
    for name, low in at_least.items():
        value = getattr(args, name)
        if value < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low:g}; got {value}")
