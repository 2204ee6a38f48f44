"""Memory and time of the loss-aware metric's pass (``spap.gradients.output_gradient_grams``) on SmolLM2.

The pass runs one forward and one backward pass of the dense model per calibration sequence and
accumulates ``G = Σ g gᵀ`` at every ``down_proj`` output.  Two choices trade memory for time:

- ``head_chunk``: positions per evaluation of the language-model head (its ``(positions, vocabulary)``
  logits are the largest tensors of the pass when taken whole);
- ``recompute``: each block's activations recomputed in the backward pass (activation checkpointing)
  instead of kept from the forward pass.

Each configuration runs in its own process (peak RSS is a per-process high-water mark) on the same
calibration sequences; the table gives the peak RSS before the pass (after loading), after it, the
process CPU seconds of the pass (less sensitive to other load than wall seconds) and its wall seconds.
The first configuration's ``G`` is the reference for the last column (largest relative difference).
Timings are printed, never asserted.

    python benchmarks/metric_pass.py --sequences 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = {  # name: (head_chunk, recompute)
    "whole head, kept": (1 << 30, False),
    "chunked head, kept": (256, False),
    "chunked head, recomputed": (256, True),
}


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(name: str, sequences: int, seqlen: int, threads: int, out: str) -> None:
    import torch

    import spap
    from spap.adapters import get_adapter
    from spap.gradients import output_gradient_grams

    torch.set_num_threads(threads)
    model, tokenizer = spap.load_model("smollm2")
    calib = spap.data.calibration_set("c4", tokenizer, n=sequences, seqlen=seqlen, seed=0)
    adapter = get_adapter(model)
    modules = {i: adapter.mlp_out(block) for i, block in enumerate(adapter.blocks())}
    head_chunk, recompute = CONFIGS[name]
    before = _peak_gib()
    cpu, wall = time.process_time(), time.perf_counter()
    grams = output_gradient_grams(model, [calib], modules, n_sequences=sequences, device=torch.device("cpu"),
                                  head_chunk=head_chunk, recompute=recompute)
    row = {"config": name, "peak_before_gib": before, "peak_after_gib": _peak_gib(),
           "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    torch.save({"row": row, "grams": grams}, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=2, help="calibration sequences in the pass")
    parser.add_argument("--seqlen", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.sequences, args.seqlen, args.threads, args.out)
        return

    import torch

    print(f"SmolLM2-135M, {args.sequences} x {args.seqlen} tokens, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            out = os.path.join(tmp, "result.pt")
            subprocess.run([sys.executable, __file__, "--worker", name, "--out", out, "--sequences", str(args.sequences),
                            "--seqlen", str(args.seqlen), "--threads", str(args.threads)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = torch.load(out, weights_only=True)
            grams = result["grams"]
            reference = reference or grams
            result["row"]["max_rel_diff"] = max(float((grams[k] - reference[k]).abs().max() / reference[k].abs().max())
                                                for k in grams)
            rows.append(result["row"])
    print("| configuration | peak RSS before GiB | peak RSS after GiB | CPU s | wall s | G max rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['peak_before_gib']:.2f} | {r['peak_after_gib']:.2f} | {r['cpu_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
