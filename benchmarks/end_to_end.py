"""Every pruning method on one real model, side by side: perplexity, prune time, memory, parameters.

For each (structure, method, sparsity) the model is loaded afresh, pruned with
``spap.prune_layerwise`` on the same calibration tokens, and evaluated on WikiText-2 test and on C4
documents ``[500:]``.  Each run is a separate Python process, so its peak RSS is its own.  Results are
cached in a JSON file (``--cache``) under a key that names the protocol, structure, method and
sparsity: an interrupted sweep goes on where it stopped, and ``--report`` prints the tables from the
cache alone.

Suites (``--suite``, several allowed):

- ``structured``: MLP channels with spap, obs, admm, flap, wanda_sp, magnitude at ``--sparsities``
  (default 10..50%).
- ``structured-heads``: the same on ``mlp+heads``.
- ``unstructured``: 50% and 60% unstructured and 2:4, with spap, sparsegpt, admm, wanda, magnitude.

Protocols (printed above every table):

- ``quick`` (CPU): calibration 64 windows of 1024 tokens from C4 docs[:500], seed 0; evaluation the
  first 40 windows of 1024 tokens of WikiText-2 test and of C4 docs[500:].
- ``standard`` (GPU or a long CPU run): calibration 128 x 2048; all windows of 2048 tokens of
  WikiText-2 test and of C4 docs[500:].

The score methods run as in their papers (no refit); ``--refit-scores`` adds ``+refit`` variants, and
``--methods admm+refit`` runs ADMM with the exact refit of its final mask instead of its last iterate.
Timings are printed, never asserted.

    python benchmarks/end_to_end.py --suite structured --sparsities 0.2 0.3 0.5 --cache bench-e2e.json
    python benchmarks/end_to_end.py --suite unstructured --cache bench-e2e.json
    python benchmarks/end_to_end.py --report --cache bench-e2e.json --plot docs/e2e
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from harness import PROTOCOLS, check_args, dense_row, evaluate, load_cache, protocol_text, run_and_cache

STRUCTURED_METHODS = ["spap", "obs", "admm", "flap", "wanda_sp", "magnitude"]
ROW_METHODS = ["spap", "sparsegpt", "admm", "wanda", "magnitude"]

DEFAULT_DAMP = 0.01  # prune_layerwise's default relative damping


@dataclass(frozen=True)
class Job:
    """One pruning run: ``structure`` as ``prune_layerwise`` takes it; ``sparsity`` None for N:M."""

    structure: str
    method: str
    sparsity: float | None
    damp: float = DEFAULT_DAMP
    target: str = "pruned"  # prune_layerwise's target: "dense" fits the dense model's outputs
    extra: tuple[tuple[str, str], ...] = ()  # further prune_layerwise keywords (``--set KEY=VALUE``), as text
    calib_seed: int = 0  # the calibration draw's seed (the validation split is what that draw leaves)

    def key(self, protocol: str) -> str:
        s = "nm" if self.sparsity is None else f"{self.sparsity:g}"
        return f"{protocol}|{self.structure}|{self.label}|{s}"

    @property
    def label(self) -> str:
        """The method's name in tables; a damping or target other than the default is part of it."""
        label = self.method if self.damp == DEFAULT_DAMP else f"{self.method}@damp={self.damp:g}"
        label = label if self.target == "pruned" else f"{label}@target={self.target}"
        label += "".join(f"@{k}={v}" for k, v in self.extra)
        return label if self.calib_seed == 0 else f"{label}@calib_seed={self.calib_seed}"

    @classmethod
    def from_payload(cls, fields: dict) -> "Job":
        """The job a worker receives as JSON (where tuples arrive as lists)."""
        return cls(**dict(fields, extra=tuple(tuple(kv) for kv in fields.get("extra", ()))))

    def prune_keywords(self) -> dict:
        """``extra`` as ``prune_layerwise`` keywords: each value read as a Python literal, else as text."""
        return {k: _literal(v) for k, v in self.extra}


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def setting(text: str) -> tuple[str, str]:
    """``--set`` entries: ``KEY=VALUE``, a keyword of ``prune_layerwise`` and its value."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE with KEY a keyword of prune_layerwise; got {text!r}")
    return key, value


def base_method(label: str) -> str:
    """``"spap@damp=0.1"`` → ``"spap"``, ``"admm+refit"`` → ``"admm"``."""
    return label.split("@")[0].split("+")[0]


def is_variant(label: str) -> bool:
    """A method run away from its defaults (another damping or steps, a refit): shown, not ranked or plotted."""
    return base_method(label) != label


def row_target(text: str) -> str:
    """``--row-targets`` entries: a sparsity in (0, 1) or the ``2:4`` pattern."""
    if text != "2:4":
        try:
            ok = 0 < float(text) < 1
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"takes sparsities in (0, 1) or 2:4; got {text!r}")
    return text


def jobs_for(suites: list[str], sparsities: list[float], methods: list[str] | None, refit_scores: bool,
             row_targets: list[str] = ("0.5", "0.6", "2:4"), damp: float = DEFAULT_DAMP,
             target: str = "pruned", extra: tuple[tuple[str, str], ...] = (), calib_seed: int = 0) -> list[Job]:
    jobs = []
    for suite in suites:
        if suite in ("structured", "structured-heads"):
            structure = "mlp" if suite == "structured" else "mlp+heads"
            names = methods or STRUCTURED_METHODS
            if refit_scores:
                names = names + [m + "+refit" for m in names if m in ("flap", "wanda_sp", "magnitude")]
            jobs += [Job(structure, m, s, damp, target, extra, calib_seed) for s in sparsities for m in names]
        elif suite == "unstructured":
            names = methods or ROW_METHODS
            if refit_scores:
                names = names + [m + "+refit" for m in names if m in ("wanda", "magnitude")]
            for row in row_targets:
                if ":" in row:
                    jobs += [Job(row, m, None, damp, target, extra, calib_seed) for m in names]
                else:
                    jobs += [Job("unstructured", m, float(row), damp, target, extra, calib_seed) for m in names]
    return jobs


# ---------------------------------------------------------------------------------------------------
# One run, in its own process (``harness.run_and_cache`` starts it)


def solver_and_keywords(job: Job) -> tuple[str, dict, dict]:
    """The solver's name, its options and the other ``prune_layerwise`` keywords of a job: ``+refit``
    becomes the solver's option, and ``--set method_options={...}`` is added to the options."""
    name, _, extra = job.method.partition("+")
    options = {}
    if extra == "refit":  # ADMM's own weights are its last iterate; "+refit" swaps them for the exact refit
        options = {"final": "refit"} if name == "admm" else {"refit": True}
    keywords = job.prune_keywords()
    options.update(keywords.pop("method_options", {}))
    return name, options, keywords


def run_one(job: Job, protocol: str, model_source: str, device: str | None, threads: int, floor: bool = True) -> dict:
    import torch

    import spap
    from spap.data import calibration_set

    torch.set_num_threads(threads)
    p = PROTOCOLS[protocol]
    model, tok = spap.load_model(model_source)
    calib = calibration_set("c4", tok, n=p["n"], seqlen=p["seqlen"], seed=job.calib_seed)
    name, options, keywords = solver_and_keywords(job)
    sparsity = 0.5 if job.sparsity is None else job.sparsity
    # The floor, in the same process: one plain pass of the calibration set through the dense blocks.
    floor_s = spap.forward_seconds(model, calib, device=device) if floor else None
    model, report = spap.prune_layerwise(model, calib, sparsity, method=name, structure=job.structure,
                                         method_options=options, damp=job.damp, target=job.target, device=device,
                                         progress=False, **keywords)
    row = {
        "structure": job.structure, "method": job.label, "sparsity": job.sparsity, "damp": job.damp, "target": job.target,
        **evaluate(model, tok, protocol, seed=job.calib_seed),
        "prune_s": report.seconds, "solver_s": report.solver_seconds, "metric_s": report.metric_seconds,
        "floor_s": floor_s, "stage_s": report.stage_seconds,
        "peak_rss_gib": report.peak_memory["rss"] / 2**30,
        "peak_cuda_gib": report.peak_memory.get("cuda", 0) / 2**30,
        "params": report.params_after, "params_dense": report.params_before,
        "sum_rel_err": sum(r.relative_error for r in report.layers),
        "layers": len(report.layers),
    }
    if report.allocation is not None:  # allocation=...: every block's pruned units and the rule's time
        row["allocation"] = report.allocation
        row["allocation_s"] = report.allocation_seconds
    chosen = [r for r in report.layers if r.selection is not None]
    if chosen:  # masks chosen by loss (candidates=...): how often each candidate won, and every choice
        winners = [r.selection["method"] for r in chosen]
        row["winners"] = {m: winners.count(m) for m in dict.fromkeys(winners)}
        row["selection"] = [{"block": r.block, "target": r.target, **r.selection} for r in chosen]
    return row


# ---------------------------------------------------------------------------------------------------
# The sweep: the cache of finished runs (harness.py) and a subprocess per missing one


def sweep(args) -> dict:
    cache_path = Path(args.cache)
    cache = load_cache(cache_path)
    todo = []
    dense_key = f"{args.protocol}|dense"
    if dense_key not in cache:
        todo.append((dense_key, None))
    for job in jobs_for(args.suite, args.sparsities, args.methods, args.refit_scores, args.row_targets, args.damp,
                        args.target, tuple(args.set), args.calib_seed):
        if job.key(args.protocol) not in cache:
            todo.append((job.key(args.protocol), job))
    print(protocol_text(args.protocol), flush=True)
    if args.calib_seed:
        print(f"this sweep calibrates on the draw with seed {args.calib_seed} instead (its rows: METHOD@calib_seed="
              f"{args.calib_seed}); validation: the C4 docs[:500] that draw does not use", flush=True)
    print(f"{len(todo)} runs to do, {len(cache)} cached in {cache_path}", flush=True)
    for i, (key, job) in enumerate(todo, 1):
        if key in load_cache(cache_path):  # finished meanwhile by a sweep running beside this one
            print(f"[{i}/{len(todo)}] {key}: cached by another sweep, skipped", flush=True)
            continue
        payload = {"protocol": args.protocol, "model": args.model, "device": args.device, "threads": args.threads,
                   "floor": args.floor, "job": None if job is None else job.__dict__}
        done = run_and_cache(cache_path, key, payload, script=__file__, timeout=args.timeout,
                             threads=args.threads, device=args.device, label=f"[{i}/{len(todo)}] {key}")
        if done is None:
            continue
        cache, row = done
        print(f"[{i}/{len(todo)}] {key}: wiki {row['wikitext_ppl']:.3f}, c4 {row['c4_ppl']:.3f}, "
              f"{row['wall_s']:.0f} s", flush=True)
    return cache


# ---------------------------------------------------------------------------------------------------
# Tables and plots


def layerwise_rows(cache: dict, protocol: str, structure: str) -> list[dict]:
    """The cached runs of ``prune_layerwise`` methods for one structure.

    The cache file is shared with ``ddp_run.py`` and ``leap_run.py``, whose rows (other columns, a
    model-level method) are reported by those scripts and left out here.
    """
    import solvers

    known = set(solvers.available_methods())
    return [r for k, r in cache.items() if k.startswith(f"{protocol}|{structure}|") and base_method(r["method"]) in known]


def table(cache: dict, protocol: str, structure: str) -> str:
    rows = layerwise_rows(cache, protocol, structure)
    if not rows:
        return ""
    dense = cache.get(f"{protocol}|dense")
    lines = [f"### {structure}", "", protocol_text(protocol), ""]
    head = ("| sparsity | method | WikiText-2 ppl | C4 ppl | val ppl | prune s | x fwd | solver s | threads | peak RSS GiB "
            "| params | Σ rel.err |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    if dense:
        lines.append(f"| 0 | dense | {dense['wikitext_ppl']:.2f} | {dense['c4_ppl']:.2f} | {_val(dense)} | | | | | | "
                     f"{dense['params']:,} | |")
    order = {m: i for i, m in enumerate(dict.fromkeys(STRUCTURED_METHODS + ROW_METHODS))}
    rows.sort(key=lambda r: (r["sparsity"] if r["sparsity"] is not None else 9, order.get(base_method(r["method"]), 99), r["method"]))
    for r in rows:
        s = structure if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        lines.append(f"| {s} | {r['method']} | {r['wikitext_ppl']:.2f} | {r['c4_ppl']:.2f} | {_val(r)} | {r['prune_s']:.0f} | "
                     f"{_floors(r)} | {r['solver_s']:.0f} | {r.get('threads', '?')} | {r['peak_rss_gib']:.2f} | {r['params']:,} | {r['sum_rel_err']:.3f} |")
    best = {}
    for r in rows:
        if is_variant(r["method"]):
            continue
        if r["wikitext_ppl"] < best.get(r["sparsity"], (float("inf"), ""))[0]:
            best[r["sparsity"]] = (r["wikitext_ppl"], r["method"])
    lines += ["", "lowest WikiText-2 perplexity (methods at their defaults): " + "; ".join(
        f"{structure if s is None else f'{s:.0%}'}: {m} ({p:.2f})" for s, (p, m) in best.items())]
    return "\n".join(lines)


def _floors(row: dict) -> str:
    """Prune time in forward passes of the calibration set (same run), blank for runs cached before it was measured."""
    return f"{row['prune_s'] / row['floor_s']:.2f}" if row.get("floor_s") else ""


def stage_table(cache: dict, protocol: str) -> str:
    """Where each measured run's prune time went, in forward passes of the calibration set (same run)."""
    rows = [r for k, r in cache.items() if k.startswith(f"{protocol}|") and r.get("floor_s") and r.get("stage_s")]
    if not rows:
        return ""
    stages = list(dict.fromkeys(k for r in rows for k in r["stage_s"]))
    head = "| structure | sparsity | method | fwd s | prune s | x fwd | " + " | ".join(stages) + " | other |"
    lines = ["### time by stage (seconds / one forward pass)", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = r["floor_s"]
        other = r["prune_s"] - sum(r["stage_s"].values())
        cells = " | ".join(f"{r['stage_s'].get(k, 0.0) / f:.2f}" for k in stages)
        s = "nm" if r["sparsity"] is None else f"{r['sparsity']:.0%}"
        lines.append(f"| {r['structure']} | {s} | {r['method']} | {f:.0f} | {r['prune_s']:.0f} | {r['prune_s'] / f:.2f} | "
                     f"{cells} | {other / f:.2f} |")
    return "\n".join(lines)


def _val(row: dict) -> str:
    """The validation perplexity, blank for runs cached before it was measured."""
    return "" if row.get("val_ppl") is None else f"{row['val_ppl']:.2f}"


def plot(cache: dict, protocol: str, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for structure in ("mlp", "mlp+heads"):
        rows = [r for r in layerwise_rows(cache, protocol, structure) if not is_variant(r["method"])]
        if not rows:
            continue
        dense = cache.get(f"{protocol}|dense")
        # A collapsed model (magnitude without refit: perplexity in the millions) would flatten every
        # other curve; such methods are listed in the legend as off the scale instead.
        cap = 20 * dense["wikitext_ppl"] if dense else float("inf")
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            color = f"C{i}"  # the same colour for a method in both panels
            rs = sorted((r for r in rows if r["method"] == method and r["wikitext_ppl"] <= cap), key=lambda r: r["sparsity"])
            if not rs:
                ax1.plot([], [], "x", color=color, label=f"{method} (above {cap:.0f}, off the scale)")
                continue
            ax1.plot([r["sparsity"] for r in rs], [r["wikitext_ppl"] for r in rs], "o-", color=color, label=method)
            ax2.scatter([r["prune_s"] for r in rs], [r["wikitext_ppl"] for r in rs], color=color, label=method)
        if dense:
            ax1.axhline(dense["wikitext_ppl"], color="k", ls=":", label="dense")
        ax1.set(xlabel="sparsity (MLP channels)" if structure == "mlp" else "sparsity (MLP channels + KV groups)",
                ylabel="WikiText-2 perplexity", yscale="log", title=f"{structure}, {protocol} protocol")
        ax2.set(xlabel="prune time (s)", ylabel="WikiText-2 perplexity", yscale="log", title="perplexity vs prune time")
        ax1.legend(fontsize=8)
        fig.tight_layout()
        path = f"{prefix}_{structure.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", default=["structured"], choices=["structured", "structured-heads", "unstructured"])
    parser.add_argument("--protocol", default="quick", choices=list(PROTOCOLS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--target", choices=["pruned", "dense", "block"], default="pruned",
                        help="what each layer fits: its own outputs on the pruned inputs (default), the dense "
                             "model's, or the dense block's output (cached and shown as METHOD@target=...)")
    parser.add_argument("--set", nargs="+", type=setting, default=[], metavar="KEY=VALUE",
                        help="further prune_layerwise keywords (e.g. output_metric=full, or "
                             "method_options={'round_precision':'float64'}, added to the solver's options); part of the cached label")
    parser.add_argument("--calib-seed", type=int, default=0,
                        help="seed of the calibration draw from C4 docs[:500] (default 0); the validation split is "
                             "then what that draw leaves. Another value is cached and shown as METHOD@calib_seed=N, "
                             "to see how much a table's figures move with the calibration set")
    parser.add_argument("--damp", type=float, default=DEFAULT_DAMP,
                        help="relative damping of every Gram matrix (default 0.01); another value is "
                             "cached and shown as METHOD@damp=VALUE")
    parser.add_argument("--row-targets", nargs="+", type=row_target, default=["0.5", "0.6", "2:4"],
                        help="unstructured suite: sparsities and N:M patterns (default: 0.5 0.6 2:4)")
    parser.add_argument("--methods", nargs="+", help="default: every method of the suite")
    parser.add_argument("--refit-scores", action="store_true", help="also run score methods with the exact refit")
    parser.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file, or a Hugging Face directory")
    parser.add_argument("--device", default=None, help="default: CUDA when available, else CPU")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the timed forward pass of the calibration set (the 'x fwd' column) before each prune")
    parser.add_argument("--cache", default="end_to_end.json", help="JSON file of finished runs (resumable)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it is abandoned")
    parser.add_argument("--report", action="store_true", help="print the tables from the cache, run nothing")
    parser.add_argument("--plot", help="write PREFIX_mlp.png (and PREFIX_mlp_heads.png) from the cache")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        payload = json.loads(args.worker)
        if payload["job"] is None:
            row = dense_row(payload["protocol"], payload["model"], payload["device"], payload["threads"])
        else:
            row = run_one(Job.from_payload(payload["job"]), payload["protocol"], payload["model"], payload["device"],
                          payload["threads"], payload.get("floor", True))
        print(json.dumps(row))
        return
    check_args(parser, args, at_least={"threads": 1, "calib_seed": 0})
    if args.methods:
        import solvers

        known = solvers.available_methods()
        for method in args.methods:
            name, plus, extra = method.partition("+")
            if name not in known or (plus and extra != "refit"):
                parser.error(f"--methods takes names from {', '.join(known)}, optionally with '+refit'; got {method!r}")
    if not args.damp >= 0:
        parser.error(f"--damp must be >= 0; got {args.damp}")
    t = time.perf_counter()
    cache = load_cache(Path(args.cache)) if args.report else sweep(args)
    print()
    for structure in ("mlp", "mlp+heads", "unstructured", "2:4"):
        text = table(cache, args.protocol, structure)
        if text:
            print(text, end="\n\n")
    text = stage_table(cache, args.protocol)
    if text:
        print(text, end="\n\n")
    if args.plot:
        for path in plot(cache, args.protocol, args.plot):
            print(f"plot: {path}")
    if not args.report:
        print(f"sweep wall time {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
