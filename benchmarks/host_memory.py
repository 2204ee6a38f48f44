"""Host memory of a SmolLM2 prune block by block, with and without returning the heap's free pages.

The prune calls ``spap.hostmemory.release_free_memory`` (glibc ``malloc_trim``) after the loss-aware
metric's pass, after each block and, on the CPU, before each pass of a batch through a block.  This script runs the same prune twice, each in its own process
(peak RSS is a per-process high-water mark): as the package does (``released``) and with that call
replaced by a no-op (``kept``).  A thread samples the resident set every 10 ms and charges it to the
block being pruned (by ``report.block_seconds``: the blocks run one after the other at the end of the
prune); the table gives, per block, the highest sample, and the processes' peak RSS (``ru_maxrss``,
which includes loading the model).  Memory only: seconds are not reported.

    python benchmarks/host_memory.py --target dense --parallel
    python benchmarks/host_memory.py --target dense --windows 16 --seqlen 512 --parallel   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

CONFIGS = ("released", "kept")


def _resident_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def worker(args, config: str, out: str) -> None:
    import torch

    import spap
    import spap.pipeline
    from spap.data import calibration_set

    torch.set_num_threads(args.threads)
    samples: list[tuple[float, float]] = []  # (perf_counter, resident GiB)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), _resident_gib()))
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    model, tokenizer = spap.load_model("smollm2")
    calib = calibration_set("c4", tokenizer, n=args.windows, seqlen=args.seqlen, seed=0)
    if config == "kept":
        spap.pipeline.release_free_memory = lambda: False
    loaded = time.perf_counter()
    model, report = spap.prune_layerwise(model, calib, args.sparsity, target=args.target,
                                         batch_size=args.batch_size, progress=False)
    end = time.perf_counter()
    done.set()
    # The blocks run one after the other at the end of the prune: block i ended the later blocks' seconds
    # before the last one did (which is about when the prune returned).
    ends = [end - sum(report.block_seconds[i + 1:]) for i in range(len(report.block_seconds))]
    starts = [e - s for e, s in zip(ends, report.block_seconds)]
    peaks: dict[str, float] = {}
    for t, rss in samples:
        if t < loaded:
            where = "load"
        elif t < starts[0]:
            where = "before the blocks"
        else:
            where = next((str(i) for i, e in enumerate(ends) if t <= e), "after the blocks")
        peaks[where] = max(peaks.get(where, 0.0), rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    with open(out, "w") as f:
        json.dump({"config": config, "per_block": peaks, "peak_rss_gib": peak}, f)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="dense", choices=["pruned", "dense"])
    parser.add_argument("--windows", type=int, default=64, help="calibration windows (default 64: quick protocol)")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--parallel", action="store_true", help="run the two processes at once")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args, args.worker, args.out)
        return []
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--parallel",)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {c: os.path.join(tmp, f"{c}.json") for c in CONFIGS}
        commands = [[sys.executable, __file__, *forwarded, "--worker", c, "--out", outs[c]] for c in CONFIGS]
        if args.parallel:
            for p in [subprocess.Popen(c, stderr=subprocess.DEVNULL) for c in commands]:
                if p.wait():
                    raise SystemExit(f"a worker failed: {p.args}")
        else:
            for c in commands:
                subprocess.run(c, check=True, stderr=subprocess.DEVNULL)
        for c in CONFIGS:
            with open(outs[c]) as f:
                results.append(json.load(f))
    print(f"SmolLM2-135M, MLP channels {args.sparsity:.0%}, target {args.target}, {args.windows} x {args.seqlen} "
          f"C4 tokens, batch {args.batch_size}, {args.threads} thread(s) per process; peak resident GiB")
    labels = list(dict.fromkeys(k for r in results for k in r["per_block"]))
    print("| where | " + " | ".join(CONFIGS) + " |")
    print("|---|" + "---|" * len(CONFIGS))
    for label in labels:
        name = f"block {label}" if label.isdigit() else label
        print(f"| {name} | " + " | ".join(f"{r['per_block'].get(label, float('nan')):.2f}" for r in results) + " |")
    print("| process peak (ru_maxrss) | " + " | ".join(f"{r['peak_rss_gib']:.2f}" for r in results) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
