"""Inference speed and memory of dense vs MLP-channel-pruned models, with stock transformers.

Speed depends on shapes, not on weight values, so each "pruned" model is the dense model's config with
the MLP width that ``spap.prune_layerwise(..., structure="mlp")`` produces at that sparsity
(``width − round(sparsity · width)``, the same in every block), built with random weights: it has
exactly the layout of the checkpoint that ``spap.save_model`` writes.  ``--checkpoint DIR`` times a
saved checkpoint as well (one from ``spap.save_pruned`` too).

``--mlp-widths`` adds models whose blocks have different MLP widths (GISP's and DDP's non-uniform
layouts): the dense random-weight model with block ``i`` cut to its first ``w_i`` channels through
``spap.units`` (what ``spap.load_pruned`` does), so the layout is the one spap produces.  Each value
is a comma list with one width per block, ``ramp:LO:HI`` (widths rising linearly from LO in the first
block to HI in the last) or ``alt:LO:HI`` (LO, HI, LO, ...).  ``ramp:398:1138`` has the same total as
a uniform 768 over 30 blocks (SmolLM2 at 50%), hence the same parameter count.

Measured per model, ``--repeats`` times after one warm-up: prefill of 1 × ``--prompt`` tokens, and
decode of ``--new-tokens`` greedy tokens at each batch size in ``--batches``.  The table gives the
median tokens/s with the min–max spread, the speedup of the medians over dense, and the parameter
memory.  Timings are printed, never asserted.

    python benchmarks/inference.py                                     # SmolLM2-135M shapes, CPU
    python benchmarks/inference.py --model llama3-8b --device cuda     # Llama-3-8B shapes (GPU)
    python benchmarks/inference.py --plot docs/speedup.png --json speed.json
    python benchmarks/inference.py --sparsities 0.5 --mlp-widths ramp:398:1138  # uniform vs non-uniform
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from spap.eval import throughput

# Shapes only (no weights are read): SmolLM2-135M and Llama-3-8B.
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                    rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
                      rope_theta=500000.0, rms_norm_eps=1e-5),
}


def build(shape: str, sparsity: float, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SHAPES[shape])
    cfg["intermediate_size"] -= round(sparsity * cfg["intermediate_size"])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    return model.eval()


def parse_widths(text: str, n_blocks: int, dense: int) -> list[int]:
    """Per-block MLP widths from ``W,W,...``, ``ramp:LO:HI`` or ``alt:LO:HI``; ``ValueError`` unless there is
    one width per block, each in ``1..dense``."""
    kind, _, rest = text.partition(":")
    if kind in ("ramp", "alt"):
        lo, hi = (int(v) for v in rest.split(":"))
        if kind == "ramp":
            widths = [round(lo + (hi - lo) * i / max(n_blocks - 1, 1)) for i in range(n_blocks)]
        else:
            widths = [lo if i % 2 == 0 else hi for i in range(n_blocks)]
    else:
        widths = [int(v) for v in text.split(",")]
    if len(widths) != n_blocks or not all(1 <= w <= dense for w in widths):
        raise ValueError(f"{text!r} must give {n_blocks} widths, each in 1..{dense}; it gives {widths}.")
    return widths


def build_widths(shape: str, widths: list[int], dtype: torch.dtype, device: str):
    """The dense random-weight model with block ``i`` cut to its first ``widths[i]`` MLP channels, by
    ``spap.units`` (the config keeps the dense size where widths differ, as for GISP's models)."""
    from spap import units
    from spap.adapters import get_adapter

    model = build(shape, 0.0, dtype, device)
    adapter = get_adapter(model)
    for block, w in zip(adapter.blocks(), widths):
        units.keep(adapter, block, {"mlp": torch.arange(w)})
    units.set_widths(adapter, {"mlp": widths})
    return model


def width_label(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}–{max(widths)}"


def measure(model, args, repeats: int | None = None, warmup: int = 1) -> dict:
    repeats = args.repeats if repeats is None else repeats
    row = {"params": sum(p.numel() for p in model.parameters()),
           "param_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30}
    row["prefill"] = throughput(model, prompt_len=args.prompt, new_tokens=1, batch=1, repeats=repeats,
                                warmup=warmup)["prefill"]
    for b in args.batches:
        row[f"decode_b{b}"] = throughput(model, prompt_len=args.decode_prompt, new_tokens=args.new_tokens, batch=b,
                                         repeats=repeats, warmup=warmup)["decode"]
    if torch.device(args.device).type == "cuda":
        row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return row


def measure_interleaved(models: list, args) -> list[dict]:
    """:func:`measure` of every model, one repeat of each in turn (``args.repeats`` rounds, the first one
    after a warm-up): a load change on a shared machine then slows every model alike."""
    rows: list[dict] = [{} for _ in models]
    for i in range(args.repeats):
        for row, model in zip(rows, models):
            for key, value in measure(model, args, repeats=1, warmup=int(i == 0)).items():
                if isinstance(value, list):
                    row.setdefault(key, []).extend(value)
                else:
                    row[key] = value
        print(f"  round {i + 1}/{args.repeats}", flush=True)
    return rows


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(SHAPES))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--checkpoint", nargs="*", default=[], help="saved checkpoints to time as well")
    parser.add_argument("--mlp-widths", nargs="*", default=[], metavar="WIDTHS",
                        help="per-block MLP widths to time as well: W,W,... (one per block), ramp:LO:HI or alt:LO:HI")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt", type=int, default=2048, help="prefill length (batch 1)")
    parser.add_argument("--decode-prompt", type=int, default=128, help="prompt before the timed decode")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--interleave", action="store_true",
                        help="build every model first, then time one repeat of each in turn (fair on a shared machine)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    if any(not 0 <= s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must be in [0, 1); got {args.sparsities}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    shape = SHAPES[args.model]
    try:
        width_sets = [parse_widths(w, shape["num_hidden_layers"], shape["intermediate_size"]) for w in args.mlp_widths]
    except ValueError as e:
        parser.error(f"--mlp-widths: {e}")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
               else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(f"{args.model} shapes, {args.dtype}, {machine}, torch {torch.__version__}; prefill 1x{args.prompt}, "
          f"decode {args.new_tokens} tokens after a {args.decode_prompt}-token prompt at batch {args.batches}; "
          f"median (min–max) of {args.repeats} runs" + (", models in turn" if args.interleave else ""), flush=True)
    # (row, model builder): dense, uniform widths per sparsity, --mlp-widths, --checkpoint
    todo = []
    for s in [0.0] + [s for s in args.sparsities if s > 0]:
        width = shape["intermediate_size"] - round(s * shape["intermediate_size"])
        todo.append(({"name": "dense" if s == 0 else f"mlp {s:.0%}", "sparsity": s, "mlp_width": width},
                     lambda s=s: build(args.model, s, dtype, args.device)))
    for text, widths in zip(args.mlp_widths, width_sets):
        row = {"name": text.split(":")[0] if ":" in text else "widths", "sparsity": None, "widths": widths,
               "mlp_width": width_label(widths)}
        todo.append((row, lambda w=widths: build_widths(args.model, w, dtype, args.device)))
    for path in args.checkpoint:
        def load(path=path):
            from spap import load_model

            return load_model(path, dtype=dtype, device=args.device)[0]

        todo.append(({"name": Path(path).name, "sparsity": None}, load))
    def described(row: dict, model) -> dict:
        if "mlp_width" not in row:  # a checkpoint: widths read from its weights
            from spap import layer_widths

            row = {**row, "widths": layer_widths(model)["intermediate_size"]}
            row["mlp_width"] = width_label(row["widths"])
        return row

    rows = []
    if args.interleave:
        models = [make() for _, make in todo]
        for (row, _), model, timed in zip(todo, models, measure_interleaved(models, args)):
            rows.append({**described(row, model), **timed})
        del models
    else:
        for row, make in todo:
            t = time.perf_counter()
            model = make()
            rows.append({**described(row, model), **measure(model, args)})
            del model
            print(f"  {row['name']}: {time.perf_counter() - t:.0f} s", flush=True)

    dense = rows[0]
    cols = ["prefill"] + [f"decode_b{b}" for b in args.batches]
    head = f"{'model':<14}{'MLP width':>10}{'params':>14}{'GiB':>7}" + "".join(f"{c + ' tok/s':>24}{'×':>6}" for c in cols)
    print()
    print(head)
    for r in rows:
        line = f"{r['name']:<14}{r['mlp_width']:>10}{r['params']:>14,}{r['param_gib']:>7.2f}"
        for c in cols:
            line += f"{spread(r[c]):>24}{statistics.median(r[c]) / statistics.median(dense[c]):>6.2f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        pruned = [r for r in rows if r["sparsity"] is not None]
        for c in cols:
            med = [statistics.median(r[c]) / statistics.median(dense[c]) for r in pruned]
            lo = [min(r[c]) / statistics.median(dense[c]) for r in pruned]
            hi = [max(r[c]) / statistics.median(dense[c]) for r in pruned]
            xs = [r["sparsity"] for r in pruned]
            ax.errorbar(xs, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]], marker="o",
                        capsize=3, label=c)
        ax.axhline(1, color="k", ls=":")
        ax.set(xlabel="MLP channel sparsity", ylabel="speedup over dense (median, min–max)",
               title=f"{args.model} shapes, {machine}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
