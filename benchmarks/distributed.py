"""One process against several: the same SmolLM2 prune under ``torchrun``, its time, memory and masks.

    python benchmarks/distributed.py                                   # 1 and 2 gloo processes on the CPU
    python benchmarks/distributed.py --procs 1 2 --windows 32 --seqlen 512 --json distributed.json
    python benchmarks/distributed.py --device cuda --procs 1 2 4       # NCCL, one GPU per process (not yet run)

For each process count the script launches itself under ``python -m torch.distributed.run`` (a single
process runs without a process group).  Every rank loads SmolLM2-135M, takes its consecutive shard of the
``--windows`` C4 calibration windows (docs[:500], seed 0) and runs ``spap.prune_layerwise`` on it, with batches of
``--batch-size`` sequences (a rank's batches are then the single process's).  Rank 0 gathers each rank's
wall time and peak memory (host RSS; CUDA peak on a GPU) and the pruned weights.  The table compares
every run with the single process: identical masks (the same weights pruned, the same MLP channels kept)
and the largest weight difference.  Timings are printed, never asserted.  Each rank's output is also kept
under torchrun's ``--log-dir``; a launch that fails raises an error quoting each rank's last stderr lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--windows", type=int, default=16, help="calibration windows in all (default 16)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--structure", default="mlp")
    p.add_argument("--output-metric", default="auto", choices=["auto", "full", "diag", "none"])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: the cores divided by the processes)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one rank, write its result there
    return p.parse_args(argv)


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    import spap
    from spap.data import calibration_set
    from spap.distributed import shard

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    device = args.device
    if world > 1:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    model, tok = spap.load_model("smollm2")
    calib = calibration_set("c4", tok, n=args.windows, seqlen=args.seqlen, seed=0)
    start = time.perf_counter()
    model, report = spap.prune_layerwise(model, calib[shard(len(calib), world, rank)], args.sparsity,
                                         structure=args.structure, batch_size=args.batch_size, device=device,
                                         output_metric=None if args.output_metric == "none" else args.output_metric,
                                         progress=rank == 0 and sys.stderr.isatty())
    seconds = time.perf_counter() - start
    row = {"rank": rank, "seconds": seconds, "prune_seconds": report.seconds,
           "peak_rss_gib": report.peak_memory.get("rss", 0) / 2**30,
           "peak_cuda_gib": report.peak_memory.get("cuda", 0) / 2**30,
           "stage_seconds": report.stage_seconds}
    rows = [row]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
    if rank == 0:
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save({"ranks": rows, "state": state, "params_after": report.params_after}, args.worker)
    if world > 1:
        dist.barrier()  # no rank tears its connections down while rank 0 is still writing
        dist.destroy_process_group()


def _launch(args, procs: int, out: Path) -> float:
    common = [str(Path(__file__).resolve()), "--worker", str(out), "--windows", str(args.windows), "--seqlen", str(args.seqlen),
              "--batch-size", str(args.batch_size), "--sparsity", str(args.sparsity), "--structure", args.structure,
              "--output-metric", args.output_metric, "--device", args.device, "--threads", str(args.threads)]
    logs = out.parent / f"logs{procs}"  # each rank's stdout and stderr, also shown as it runs (--tee)
    command = [sys.executable, *common] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
         "--log-dir", str(logs), "--tee", "3", *common]
    # PYTHONFAULTHANDLER: a rank killed by a signal (a native abort) prints every thread's Python stack first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONFAULTHANDLER="1")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"the run with {procs} process(es) failed (exit code {done.returncode}); "
                           + (rank_errors(logs) or "see its output above"))
    return time.perf_counter() - start


def rank_errors(logs: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of each rank's stderr under torchrun's ``--log-dir`` ``logs`` (progress bars
    dropped), one block per rank, or "" when there are none: what a failed rank said before it died."""
    blocks = []
    for path in sorted(logs.glob("*/attempt_*/*/stderr.log")):
        text = [ln for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines()
                if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
        if text:
            blocks.append(f"rank {path.parent.name}, {path.parent.parent.name}:\n" + "\n".join(text[-lines:]))
    return "\n".join(blocks)


def compare(reference: dict, state: dict) -> dict:
    """Whether ``state`` prunes what ``reference`` prunes (same shapes, same zero weights), how many weights
    are pruned in one and kept in the other, the first tensor where that happens, and the largest absolute
    weight difference (over tensors of the same shape)."""
    import torch

    shaped = [k for k in reference if k in state and reference[k].shape == state[k].shape]
    flips = {k: int(((reference[k] == 0) != (state[k] == 0)).sum()) for k in shaped}
    same = reference.keys() == state.keys() and len(shaped) == len(reference) and not any(flips.values())
    diff = max((float((reference[k].double() - state[k].double()).abs().max()) for k in shaped
                if reference[k].numel()), default=float("nan"))
    first = next((k for k in reference if k not in shaped or flips[k]), None)
    return {"same_masks": same, "flipped_weights": sum(flips.values()), "first_difference": first,
            "max_abs_diff": diff}


def main(argv=None) -> list[dict]:
    args = _arguments(argv)
    if args.worker:
        _worker(args)
        return []
    import torch

    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:
            out = Path(tmp) / f"procs{procs}.pt"
            wall = _launch(args, procs, out)
            result = torch.load(out, weights_only=True)
            reference = reference if reference is not None else result["state"]
            ranks = result["ranks"]
            row = {"procs": procs, "wall_s": wall, "prune_s": max(r["prune_seconds"] for r in ranks),
                   "peak_rss_gib_per_rank": [r["peak_rss_gib"] for r in ranks],
                   "peak_cuda_gib_per_rank": [r["peak_cuda_gib"] for r in ranks],
                   "stage_seconds_rank0": ranks[0]["stage_seconds"], "params_after": result["params_after"],
                   **compare(reference, result["state"])}
            rows.append(row)
    print(f"SmolLM2-135M, {args.structure} {args.sparsity:.0%}, {args.windows} x {args.seqlen} C4 tokens in all, "
          f"batch {args.batch_size}, device {args.device}")
    print(f"{'procs':>5} {'prune s':>8} {'wall s':>7} {'peak RSS GiB per rank':>24} {'same masks':>10} {'flipped':>8} {'max |dW|':>9}  first difference")
    for r in rows:
        rss = " ".join(f"{x:.2f}" for x in r["peak_rss_gib_per_rank"])
        print(f"{r['procs']:>5} {r['prune_s']:>8.1f} {r['wall_s']:>7.1f} {rss:>24} {str(r['same_masks']):>10} "
              f"{r['flipped_weights']:>8} {r['max_abs_diff']:>9.2e}  {r['first_difference'] or '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
