"""The ``spap`` command line: ``prune``, ``eval``, ``info`` and ``demo``.

    spap demo                                              # the README's main job
    spap prune smollm2 --sparsity 0.3 --out pruned/        # any HF directory or .gguf file
    spap eval pruned/ --max-windows 40
    spap info smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

STRUCTURE_HELP = "mlp, heads, mlp+heads, unstructured, or N:M such as 2:4"


def _add_calibration(p: argparse.ArgumentParser, n: int, seqlen: int) -> None:
    p.add_argument("--calib", default="c4", help="c4 (shared C4 docs[:500]), wikitext, or a text file (default c4)")
    p.add_argument("--n", type=int, default=n, help=f"calibration windows (default {n})")
    p.add_argument("--seqlen", type=int, default=seqlen, help=f"tokens per window (default {seqlen})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="shared data folder (default $SPAP_DATA_DIR or ../shared/data)")


def _add_pruning(p: argparse.ArgumentParser) -> None:
    import solvers

    p.add_argument("--sparsity", type=float, default=0.3, help="fraction pruned per block (default 0.3)")
    p.add_argument("--method", default="spap", choices=solvers.available_methods())
    p.add_argument("--structure", default="mlp", help=STRUCTURE_HELP + " (default mlp)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a solver option (repeatable; VALUE read as JSON when it parses, e.g. refit=true)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dense-propagation", action="store_true", help="next block's inputs from the dense block")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spap", description="Layer-wise pruning of language models by optimization.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the smaller checkpoint")
    p.add_argument("model", help="'smollm2', a Hugging Face model directory, or a .gguf file")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (checkpoints in OUT.partial)")
    p.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 windows of 1024 to evaluate after (default 0)")
    _add_pruning(p)
    _add_calibration(p, 64, 1024)

    p = sub.add_parser("eval", help="WikiText-2 perplexity and tokens/second")
    p.add_argument("model")
    p.add_argument("--text", default="wikitext", help="wikitext (WikiText-2 test rows) or a text/.json/.jsonl file")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--device")
    p.add_argument("--data-dir")

    p = sub.add_parser("info", help="architecture, sizes and what spap can prune in it")
    p.add_argument("model")

    p = sub.add_parser("demo", help="prune SmolLM2-135M (30%% MLP channels, SPAP) and report cost and effect")
    _add_pruning(p)
    _add_calibration(p, 32, 512)
    p.add_argument("--eval-windows", type=int, default=20, help="WikiText-2 windows of 1024 tokens (default 20)")
    return parser


def _validate(args) -> None:
    """Argument checks that argparse cannot express, before any model is loaded."""
    from .units import PruneStructure

    if hasattr(args, "sparsity") and not 0 <= args.sparsity < 1:
        raise SystemExit(f"spap: error: --sparsity must be in [0, 1); got {args.sparsity}")
    if hasattr(args, "structure"):
        try:
            PruneStructure.parse(args.structure)
        except ValueError as e:
            raise SystemExit(f"spap: error: --structure: {e}") from None
    for name in ("n", "seqlen", "batch_size", "max_windows"):
        if hasattr(args, name) and getattr(args, name) <= 0:
            raise SystemExit(f"spap: error: --{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    if hasattr(args, "option"):
        import solvers

        try:
            solvers.check_method(args.method, _options(args.option))
        except ValueError as e:
            raise SystemExit(f"spap: error: --option: {e}") from None
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        raise SystemExit("spap: error: --device cuda, but torch sees no CUDA device")
    model = getattr(args, "model", "smollm2")
    if model != "smollm2" and not (Path(model).is_dir() or (Path(model).suffix == ".gguf" and Path(model).is_file())):
        raise SystemExit(f"spap: error: model {model!r} must be 'smollm2', a Hugging Face model directory or a "
                         ".gguf file, and it was not found")
    for name in ("calib", "text"):
        value = getattr(args, name, None)
        if value not in (None, "c4", "wikitext") and not Path(value).is_file():
            raise SystemExit(f"spap: error: --{name} must be c4, wikitext or an existing file; got {value!r}")
    if args.command == "prune":
        out = Path(args.out)
        if out.exists():
            raise SystemExit(f"spap: error: --out {out} already exists; choose a new directory")
        if args.resume and not (_partial(out) / "settings.json").is_file():
            raise SystemExit(f"spap: error: --resume, but {_partial(out)} holds no interrupted run")


def _partial(out: Path) -> Path:
    """Where ``prune`` keeps its per-block checkpoints until the output is saved."""
    return Path(str(out).rstrip("/") + ".partial")


def _options(pairs: list[str]) -> dict:
    """``["refit=true", "rho=0.5"]`` -> ``{"refit": True, "rho": 0.5}``."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"spap: error: --option must be KEY=VALUE; got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _calibration(args, tokenizer) -> torch.Tensor:
    from .data import calibration_set

    return calibration_set(args.calib, tokenizer, n=args.n, seqlen=args.seqlen, seed=args.seed, path=args.data_dir)


def _prune(args, model, tokenizer, checkpoint_dir=None, resume=False):
    from .pipeline import prune_layerwise

    calib = _calibration(args, tokenizer)
    return prune_layerwise(
        model, calib, args.sparsity, method=args.method, structure=args.structure, damp=args.damp,
        method_options=_options(args.option),
        batch_size=args.batch_size, device=args.device, propagate="dense" if args.dense_propagation else "pruned",
        checkpoint_dir=checkpoint_dir, resume=resume,
    )


def _wikitext_ppl(model, tokenizer, windows: int, data_dir=None, seqlen: int = 1024, text: str = "wikitext") -> float:
    from .data import text_file, wikitext_rows
    from .eval import perplexity

    rows = wikitext_rows(path=data_dir) if text == "wikitext" else text_file(text)
    return perplexity(model, tokenizer, rows, seqlen=seqlen, max_windows=windows, progress=True)


def cmd_prune(args) -> None:
    from .models import load_model, save_model

    model, tokenizer = load_model(args.model)
    partial = _partial(Path(args.out))
    model, report = _prune(args, model, tokenizer, checkpoint_dir=str(partial), resume=args.resume)
    if args.eval_windows:
        report.settings["wikitext_ppl"] = _wikitext_ppl(model, tokenizer, args.eval_windows, args.data_dir)
    save_model(model, tokenizer, args.out, report=report)
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    print(report.summary())
    if args.eval_windows:
        print(f"WikiText-2 perplexity ({args.eval_windows} windows of 1024): {report.settings['wikitext_ppl']:.3f}")
    print(f"saved to {args.out} (report: {Path(args.out) / 'spap_report.json'})")


def cmd_eval(args) -> None:
    from .eval import tokens_per_second
    from .models import load_model

    model, tokenizer = load_model(args.model, device=args.device or "cpu")
    ppl = _wikitext_ppl(model, tokenizer, args.max_windows, args.data_dir, args.seqlen, args.text)
    speed = tokens_per_second(model)
    print(json.dumps({"text": args.text, "perplexity": ppl, "windows": args.max_windows, "seqlen": args.seqlen,
                      "prefill_tokens_per_s": speed["prefill"], "decode_tokens_per_s": speed["decode"]}, indent=1))


def cmd_info(args) -> None:
    import solvers

    from .adapters import get_adapter
    from .models import load_model
    from .report import count_parameters

    model, _ = load_model(args.model)
    a = get_adapter(model)
    print(f"model: {type(model).__name__} (model_type={model.config.model_type!r}, adapter {type(a).__name__})")
    print(f"blocks: {len(a.blocks())}; hidden {model.config.hidden_size}; MLP width {a.intermediate_size}; "
          f"heads {a.n_heads} ({a.n_kv_heads} key-value, head_dim {a.head_dim})")
    print(f"parameters: {count_parameters(model):,}")
    print(f"structures: mlp, heads{'' if a.shrink_heads else ' (zeros stored: head_dim is derived)'}, mlp+heads, unstructured, N:M")
    print(f"methods: {', '.join(solvers.available_methods())}")


def cmd_demo(args) -> None:
    from .eval import tokens_per_second
    from .models import load_model
    from .report import count_parameters

    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    print(f"SmolLM2-135M-Instruct: {count_parameters(model):,} parameters (loaded in {time.perf_counter() - t0:.1f} s)")
    dense_ppl = _wikitext_ppl(model, tokenizer, args.eval_windows, args.data_dir)
    dense_speed = tokens_per_second(model)
    print(f"calibration: {args.n} windows of {args.seqlen} tokens from {args.calib} (seed {args.seed}); "
          f"pruning {args.sparsity:.0%} ({args.structure}) with {args.method}")
    model, report = _prune(args, model, tokenizer)
    pruned_ppl = _wikitext_ppl(model, tokenizer, args.eval_windows, args.data_dir)
    pruned_speed = tokens_per_second(model)
    print()
    print(report.summary())
    print(f"{'':<26}{'dense':>12}{'pruned':>12}")
    print(f"{f'WikiText-2 ppl ({args.eval_windows}x1024)':<26}{dense_ppl:>12.3f}{pruned_ppl:>12.3f}")
    print(f"{'parameters':<26}{report.params_before:>12,}{report.params_after:>12,}")
    print(f"{'prefill tokens/s':<26}{dense_speed['prefill']:>12.0f}{pruned_speed['prefill']:>12.0f}")
    print(f"{'decode tokens/s':<26}{dense_speed['decode']:>12.1f}{pruned_speed['decode']:>12.1f}")
    print(f"prune time {report.seconds:.1f} s (solver {report.solver_seconds:.1f} s); "
          f"peak RSS {report.peak_memory['rss'] / 2**30:.2f} GiB; total {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _validate(args)
    {"prune": cmd_prune, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
