"""``spap.prune_layerwise`` on a randomly initialised model of a large shape: time and peak memory.

The model is built from a ``LlamaConfig`` (no download) with random weights in bfloat16 on the host,
calibrated on random token ids, and pruned block by block on ``--device``: one block at a time is moved
there with its Gram matrices, while the other blocks and the calibration activations stay on the host
(``offload="cpu"``).  The script prints the build time, the whole run's time, each block's time (capture,
solves, shrinking, propagation), the solver time per target, and the peak device and host memory.
Random weights make the solutions meaningless; the costs are those of a real model of the same shape,
except the swap search's length, which depends on the weights.

    python benchmarks/dry_run.py --shape llama3-8b                   # on the GPU: 32 blocks, 64 x 2048 tokens
    python benchmarks/dry_run.py --shape llama3-8b --blocks 2        # the first two blocks only
    python benchmarks/dry_run.py --shape smollm2-135m --device cpu --n 8 --seqlen 256

``--blocks k`` builds the model with its first ``k`` blocks (the per-block figures are the same; the
total scales with the number of blocks).  ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# Published shapes (config.json of each model); head_dim is hidden_size / num_attention_heads.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256),
    # For tests: runs in seconds on a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def build(shape: str, blocks: int | None, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` of ``shape`` in bfloat16 on the host, and its config."""
    import transformers

    spec = dict(SHAPES[shape])
    if blocks is not None:
        spec["num_hidden_layers"] = blocks
    config = transformers.LlamaConfig(**spec, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(seed)
    # The library's initialisation is slow on 8B parameters; a plain normal fill is enough for a dry run
    # (RMSNorm keeps the activations in range; damping keeps every Gram matrix positive definite).
    try:  # its home moved between transformers releases
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval(), config


def run(args) -> dict:
    import spap

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = time.perf_counter()
    model, config = build(args.shape, args.blocks)
    build_s = time.perf_counter() - t
    shape = {k: getattr(config, k) for k in SHAPES[args.shape]}  # before pruning narrows it
    ids = torch.randint(0, config.vocab_size, (args.n, args.seqlen), generator=torch.Generator().manual_seed(0))
    # The floor: one plain forward pass of the same tokens through the blocks, run as the prune runs them.
    floor_s = spap.forward_seconds(model, ids, batch_size=args.batch_size, device=device, offload="cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    _, report = spap.prune_layerwise(model, ids, args.sparsity, method=args.method, structure=args.structure,
                                     batch_size=args.batch_size, device=device, offload="cpu",
                                     progress=not args.quiet)
    total_s = time.perf_counter() - t
    per_target = {}
    for r in report.layers:
        per_target.setdefault(r.target, []).append(r)
    return {
        "shape": args.shape, "config": shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads",
        "method": args.method, "structure": args.structure, "sparsity": args.sparsity,
        "calibration": f"{args.n} x {args.seqlen} random token ids, batch {args.batch_size}",
        "build_s": build_s, "floor_s": floor_s, "total_s": total_s, "block_s": report.block_seconds,
        "stage_s": report.stage_seconds,
        "solver_s_per_target": {k: sum(r.seconds for r in rs) for k, rs in per_target.items()},
        "mean_rel_err_per_target": {k: statistics.mean(r.relative_error for r in rs) for k, rs in per_target.items()},
        "peak_device_gib": report.peak_memory.get("cuda", 0) / 2**30 if device.type == "cuda" else None,
        "peak_host_gib": report.peak_memory["rss"] / 2**30,
        "params_before": report.params_before, "params_after": report.params_after,
        "torch": torch.__version__,
    }


def table(r: dict) -> str:
    blocks = r["block_s"]
    lines = [
        f"shape {r['shape']} {r['config']}",
        f"device {r['device']}; {r['method']} on {r['structure']}"
        + ("" if ":" in r["structure"] else f" at {r['sparsity']:.0%}") + f"; calibration {r['calibration']}",
        f"build (random bf16 weights on the host)  {r['build_s']:.1f} s",
        f"one forward pass through the blocks      {r['floor_s']:.1f} s",
        f"prune_layerwise, whole run               {r['total_s']:.1f} s ({r['total_s'] / r['floor_s']:.2f} x the forward pass)",
        "time by stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_s"].items()),
        f"per block: mean {statistics.mean(blocks):.1f} s, min {min(blocks):.1f} s, max {max(blocks):.1f} s "
        f"over {len(blocks)} blocks",
        "solver s per target: " + ", ".join(f"{k} {v:.1f}" for k, v in r["solver_s_per_target"].items()),
        "peak device memory: " + ("n/a (CPU run)" if r["peak_device_gib"] is None else f"{r['peak_device_gib']:.2f} GiB"),
        f"peak host memory (RSS): {r['peak_host_gib']:.2f} GiB",
        f"parameters {r['params_before']:,} -> {r['params_after']:,}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--blocks", type=int, help="build only the first BLOCKS blocks (default: all of the shape)")
    parser.add_argument("--device", help="'cuda' or 'cpu' (default: cuda when available)")
    parser.add_argument("--method", default="spap", help="a registered solver (default spap)")
    parser.add_argument("--structure", default="mlp", help="mlp (default), heads, mlp+heads, unstructured or N:M")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--n", type=int, default=64, help="calibration sequences (default 64)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("blocks", "n", "seqlen", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1. Got {value}.")
    import solvers
    from spap.units import PruneStructure  # prune_layerwise's own parser, as the command line uses it

    if args.method not in solvers.available_methods():
        parser.error(f"--method must be one of {', '.join(solvers.available_methods())}. Got {args.method!r}.")
    try:
        row_structure = PruneStructure.parse(args.structure).rows
    except ValueError as e:
        parser.error(f"--structure must be mlp, heads, mlp+heads, unstructured or N:M: {e}")
    try:  # the probe prune_layerwise checks the method against, before the 8B model is built
        solvers.check_method(args.method, {}, row_structure if row_structure is not None else solvers.channels(1))
    except ValueError as e:
        parser.error(f"--method {args.method} cannot prune --structure {args.structure}: {e}")
    if not 0 <= args.sparsity < 1:
        parser.error(f"--sparsity must be in [0, 1). Got {args.sparsity}.")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here.")
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"figures: {args.json}")
    return result


if __name__ == "__main__":
    main()
