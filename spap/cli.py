"""The ``spap`` command line: ``prune``, ``eval``, ``info`` and ``demo``.

    spap demo                                              # the README's main job
    spap prune smollm2 --sparsity 0.3 --out pruned/        # any HF directory or .gguf file
    spap eval pruned/ --max-windows 40
    spap eval pruned/ --tasks piqa,arc_easy --limit 100    # zero-shot accuracy instead of perplexity
    spap info smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from .checks import InvalidArgumentError
from .distributed import RankFailed

STRUCTURE_HELP = "mlp, heads, mlp+heads, unstructured, or N:M such as 2:4"


def _add_calibration(p: argparse.ArgumentParser, n: int, seqlen: int) -> None:
    p.add_argument("--calib", default="c4",
                   help="c4 (shared C4 docs[:500]), wikitext, a .jsonl/.json/.parquet/text file, or a directory saved "
                        "by datasets' Dataset.save_to_disk (default c4)")
    p.add_argument("--calib-field", default="text",
                   help="the documents' field in .jsonl/.json objects, or column of a .parquet file or saved dataset "
                        "(default text)")
    p.add_argument("--n", "--calib-windows", dest="n", type=int, default=n,
                   help=f"calibration windows (default {n}; write --calib-windows under torchrun, whose own options "
                        "take --n for a prefix)")
    p.add_argument("--seqlen", type=int, default=seqlen, help=f"tokens per window (default {seqlen})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="shared data folder (default $SPAP_DATA_DIR or ../shared/data)")


def _add_pruning(p: argparse.ArgumentParser) -> None:
    import solvers

    p.add_argument("--sparsity", type=float, default=0.3, help="fraction pruned (default 0.3)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "owl", "knapsack"],
                   help="how the sparsity is spread over blocks, same total (default uniform: every block alike; "
                        "non-uniform widths save with spap_widths.json, loaded by spap.load_pruned)")
    p.add_argument("--method", default="spap", choices=solvers.available_methods())
    p.add_argument("--structure", default="mlp", help=STRUCTURE_HELP + " (default mlp)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a solver option (repeatable; VALUE read as JSON when it parses, e.g. refit=true)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--output-metric", default="auto", choices=["auto", "full", "diag", "none"],
                   help="weight layer errors by the loss's output gradients (default auto: full for spap on "
                        "MLP channels and heads, none otherwise)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dense-propagation", action="store_true", help="next block's inputs from the dense block")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spap", description="Layer-wise pruning of language models by optimization.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the smaller checkpoint")
    p.add_argument("model", help="'smollm2', a Hugging Face model directory, or a .gguf file")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (checkpoints in OUT.partial)")
    p.add_argument("--overwrite", action="store_true", help="delete an interrupted run in OUT.partial and start again")
    p.add_argument("--eval-windows", type=int, default=0, help="WikiText-2 windows of 1024 to evaluate after (default 0)")
    _add_pruning(p)
    _add_calibration(p, 64, 1024)

    p = sub.add_parser("eval", help="WikiText-2 perplexity and tokens/second, or zero-shot accuracy (--tasks)")
    p.add_argument("model")
    p.add_argument("--tasks", help="zero-shot accuracy instead of perplexity: 'all' or a comma list of piqa, arc_easy, "
                                   "arc_challenge, hellaswag, winogrande, boolq, lambada_openai")
    p.add_argument("--limit", type=int, help="with --tasks: the first N items of each task (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="with --tasks: rows per forward pass (default 8)")
    p.add_argument("--text", default="wikitext", help="wikitext (WikiText-2 test rows) or a text/.json/.jsonl file")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--data-dir")

    p = sub.add_parser("info", help="architecture, sizes and what spap can prune in it")
    p.add_argument("model")

    p = sub.add_parser("demo", help="prune SmolLM2-135M (30%% MLP channels, SPAP) and report cost and effect")
    _add_pruning(p)
    _add_calibration(p, 32, 512)
    p.add_argument("--eval-windows", type=int, default=20, help="WikiText-2 windows of 1024 tokens (default 20)")
    return parser


# What the command line reports as one line ("spap: error: ...") with exit code 2; anything else is a bug
# and keeps its traceback.
USER_ERRORS = (InvalidArgumentError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)
EVAL_SEQLEN = 1024  # the WikiText-2 windows of prune --eval-windows and demo


def _validate(args) -> None:
    """Every check that needs no loaded model, before anything is loaded or written: argument ranges,
    devices, files (model directory, calibration and evaluation text, data directory, output).  Raises
    one of :data:`USER_ERRORS` naming the argument."""
    from .units import PruneStructure

    if hasattr(args, "sparsity") and not 0 <= args.sparsity < 1:
        raise InvalidArgumentError(f"--sparsity must be in [0, 1); got {args.sparsity}")
    if hasattr(args, "damp") and not (math.isfinite(args.damp) and args.damp >= 0):
        raise InvalidArgumentError(f"--damp must be a finite number >= 0; got {args.damp}")
    for name in ("n", "seqlen", "batch_size", "max_windows"):
        if hasattr(args, name) and getattr(args, name) <= 0:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1; got {args.limit}")
    if getattr(args, "limit", None) is not None and getattr(args, "tasks", None) is None:
        raise InvalidArgumentError("--limit counts zero-shot items; it needs --tasks")
    if args.command == "eval" and args.seqlen < 2:
        raise InvalidArgumentError(f"--seqlen must be at least 2 (one predicted token); got {args.seqlen}")
    if hasattr(args, "eval_windows") and args.eval_windows < (1 if args.command == "demo" else 0):
        raise InvalidArgumentError(f"--eval-windows must be {'positive' if args.command == 'demo' else '>= 0'}; "
                                   f"got {args.eval_windows}")
    if hasattr(args, "seed") and not 0 <= args.seed < 2**63:
        raise InvalidArgumentError(f"--seed must be in [0, 2**63); got {args.seed}")
    if hasattr(args, "structure"):
        try:
            structure = PruneStructure.parse(args.structure)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"--structure: {e}") from None
        import solvers

        options = _options(args.option)
        try:
            solvers.check_method(args.method, options)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"--option: {e}") from None
        rows = structure.rows if structure.rows is not None else solvers.channels(1)
        try:
            solvers.check_method(args.method, options, rows)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"--method {args.method} with --structure {args.structure}: {e}") from None
    _check_device(getattr(args, "device", None))
    if args.command == "prune":
        _check_output(args)
    needs = _check_text_files(args)
    config = _check_model_source(getattr(args, "model", "smollm2"), args.command)
    for file, needed_by in needs.items():
        _check_data_file(args.data_dir, file, needed_by)
    if config is not None:
        _check_config(args, config)


def _check_device(device: str | None) -> None:
    if device is None:
        return
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise InvalidArgumentError(f"--device must be cpu, cuda or cuda:N; got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"--device {device}, but torch sees no CUDA device")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise InvalidArgumentError(f"--device {device}, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                                       f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def _check_output(args) -> None:
    """``--out`` must be new and creatable; its ``OUT.partial`` is resumed (``--resume``), replaced
    (``--overwrite``) or refused."""
    from .models import check_save_path

    out = Path(args.out)
    check_save_path(out, "--out")
    partial = _partial(out)
    if args.resume and args.overwrite:
        raise InvalidArgumentError("--resume continues the run in --out's .partial directory and --overwrite deletes "
                                   "it; pass one of them")
    if args.resume and not (partial / "settings.json").is_file():
        raise InvalidArgumentError(f"--resume, but {partial} holds no interrupted run")
    if not args.resume and not args.overwrite and partial.exists():
        raise FileExistsError(f"{partial} holds an interrupted run of --out {out}; pass --resume to continue it or "
                              "--overwrite to delete it and start again")


def _check_text_files(args) -> dict[str, str]:
    """The calibration and evaluation text files; returns the data files the command reads instead, each
    with the argument that needs it."""
    from .data import C4_FILE, WIKITEXT_FILE, is_saved_dataset, text_file

    needs = {}  # data file -> the argument that needs it
    for name in ("calib", "text"):
        value = getattr(args, name, None)
        if value in ("c4", "wikitext"):
            needs.setdefault(C4_FILE if value == "c4" else WIKITEXT_FILE, f"--{name} {value}")
        elif value is not None:
            field = getattr(args, "calib_field", "text") if name == "calib" else "text"
            if not (Path(value).is_file() or (name == "calib" and is_saved_dataset(value))):
                raise FileNotFoundError(f"--{name} must be c4, wikitext or an existing file; got {value!r}")
            try:
                text_file(value, field)
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"--{name}: {e}") from None
    if args.command == "demo" or getattr(args, "eval_windows", 0) > 0:
        needs.setdefault(WIKITEXT_FILE, "--eval-windows")
    if getattr(args, "tasks", None) is not None:
        from .zeroshot import TASK_FILES, task_names

        try:
            names = task_names(args.tasks)
        except InvalidArgumentError:
            raise InvalidArgumentError(f"--tasks must be 'all' or a comma list of distinct names from "
                                       f"{', '.join(TASK_FILES)}; got {args.tasks!r}") from None
        needs.pop(WIKITEXT_FILE, None)  # --tasks replaces the perplexity
        for name in names:
            for file in TASK_FILES[name]:
                needs.setdefault(file, f"--tasks {name}")
    return needs


def _check_data_file(data_dir: str | None, file: str, needed_by: str) -> None:
    from .data import data_dir as resolve

    try:
        directory = resolve(data_dir)
    except FileNotFoundError:
        where = (f"--data-dir {data_dir} is not a directory" if data_dir else
                 "no data directory: --data-dir not given, $SPAP_DATA_DIR not set and ../shared/data not found")
        raise FileNotFoundError(f"{where} ({needed_by} reads {file} there)") from None
    if not (directory / file).is_file():
        raise FileNotFoundError(f"--data-dir {directory} has no {file} ({needed_by} reads it)")


def _check_model_source(model: str, command: str) -> dict | None:
    """The model argument exists and, for a directory, holds a model; its config (None for smollm2 and
    .gguf files, checked after loading)."""
    from .models import model_config, smollm2_gguf_path

    if model == "smollm2":
        smollm2_gguf_path()
        return None
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return None
    if not path.exists():
        raise FileNotFoundError(f"model {model!r} must be 'smollm2', a Hugging Face model directory or a .gguf file, "
                                "and it was not found")
    try:
        config = model_config(path)
    except USER_ERRORS as e:
        raise type(e)(f"model: {e}") from None
    if command in ("prune", "eval"):
        from .models import has_tokenizer_files

        if not has_tokenizer_files(path):
            raise FileNotFoundError(f"model {model!r} has no tokenizer files (tokenizer.json or "
                                    f"tokenizer_config.json); {command} needs one to read text")
    return config


def _check_config(args, config: dict) -> None:
    """Checks against the model's configuration (``config.json``, or the loaded model's config): a family
    spap can prune, and sequence lengths within its position embeddings."""
    from .adapters import ADAPTERS

    model = getattr(args, "model", "smollm2")
    model_type = config.get("model_type")
    problem = _layout_problem(config) if args.command in ("prune", "info", "demo") and model_type not in ADAPTERS \
        else None
    if problem is not None:
        raise InvalidArgumentError(f"model {model!r} is a {model_type!r} model, which spap cannot prune ({problem}); "
                                   f"supported model types: {', '.join(sorted(ADAPTERS))}, and decoder-only models "
                                   "whose layout spap finds (docs/extending.md)")
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions") if isinstance(config.get(k), int)),
                 None)
    if limit is None:
        return
    # --tasks replaces the perplexity windows of eval: its --seqlen is unused then.
    lengths = {"--seqlen": getattr(args, "seqlen", None) if getattr(args, "tasks", None) is None else None}
    if getattr(args, "eval_windows", 0) > 0:
        lengths[f"--eval-windows (windows of {EVAL_SEQLEN} tokens)"] = EVAL_SEQLEN
    for name, length in lengths.items():
        if length is not None and length > limit:
            raise InvalidArgumentError(f"{name}: {length} tokens exceed the {limit} positions of model {model!r}")


def _layout_problem(config: dict) -> str | None:
    """Why spap would not find the layout of the model ``config`` (a ``config.json`` of a family without an
    adapter) describes, or None: the model is built on the meta device (no memory, no weights) and
    :func:`spap.adapters.discover` looks for its modules, so a refusal comes before loading."""
    import torch
    import transformers

    from .adapters import discover

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        with torch.device("meta"):
            built = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(config.get("model_type"), **fields))
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError, RuntimeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
        return f"transformers builds no causal language model from its config: {reason}"
    try:
        discover(built)
    except InvalidArgumentError as e:
        return str(e)
    return None


def _check_loaded(args, model, tokenizer, checkpoint_dir: str | None = None) -> None:
    """What only the loaded model can tell (a .gguf file's config, the pruning settings against its
    widths), before calibrating."""
    _check_config(args, model.config.to_dict())
    if tokenizer is None and args.command != "info":
        raise FileNotFoundError(f"model {getattr(args, 'model', 'smollm2')!r} has no tokenizer")
    if args.command in ("prune", "demo"):
        from .pipeline import check_arguments

        check_arguments(model, args.sparsity, method=args.method, structure=args.structure,
                        allocation=args.allocation, method_options=_options(args.option), damp=args.damp, batch_size=args.batch_size,
                        device=args.device, propagate="dense" if args.dense_propagation else "pruned",
                        output_metric=_output_metric(args), checkpoint_dir=checkpoint_dir,
                        resume=getattr(args, "resume", False))


def _output_metric(args) -> str | None:
    return None if args.output_metric == "none" else args.output_metric


def _partial(out: Path) -> Path:
    """Where ``prune`` keeps its per-block checkpoints until the output is saved."""
    return Path(str(out).rstrip("/") + ".partial")


def _options(pairs: list[str]) -> dict:
    """``["refit=true", "rho=0.5"]`` -> ``{"refit": True, "rho": 0.5}``."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--option must be KEY=VALUE; got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _calibration(args, tokenizer) -> torch.Tensor:
    from .data import calibration_set

    return calibration_set(args.calib, tokenizer, n=args.n, seqlen=args.seqlen, seed=args.seed, path=args.data_dir,
                           text_field=args.calib_field)


def _prune(args, model, tokenizer, checkpoint_dir=None, resume=False, calib=None, progress: bool = True):
    from .pipeline import prune_layerwise

    calib = _calibration(args, tokenizer) if calib is None else calib
    return prune_layerwise(
        model, calib, args.sparsity, method=args.method, structure=args.structure, allocation=args.allocation,
        damp=args.damp,
        method_options=_options(args.option),
        batch_size=args.batch_size, device=args.device, propagate="dense" if args.dense_propagation else "pruned",
        output_metric=_output_metric(args), checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
        restore_on_failure=False,  # the command line drops the model on failure: no CPU copy to undo it
    )


def _wikitext_ppl(model, tokenizer, windows: int, data_dir=None, seqlen: int = EVAL_SEQLEN,
                  text: str = "wikitext") -> float:
    from .data import text_file, wikitext_rows
    from .eval import perplexity

    rows = wikitext_rows(path=data_dir) if text == "wikitext" else text_file(text)
    return perplexity(model, tokenizer, rows, seqlen=seqlen, max_windows=windows, progress=True)


def _quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` without transformers' progress bars, logs and deprecation warnings
    (:func:`spap.models.quiet_transformers`): loading and saving, and generation, whose cache argument
    transformers 5 reports as deprecated."""
    from .models import quiet_transformers

    with quiet_transformers():
        return fn(*args, **kwargs)


def _load(source, **kwargs):
    from .models import load_model

    return _quiet(load_model, source, **kwargs)


def _process_group(args) -> tuple[int, int] | None:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL on ``cuda``, each rank on the
    GPU of its ``LOCAL_RANK``; gloo on ``cpu``) and return ``(rank, world)``; None otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if args.resume:
        raise InvalidArgumentError("--resume is single-process only; it cannot run under torchrun")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def cmd_prune(args) -> None:
    group = _process_group(args)
    try:
        _prune_command(args, group)
    finally:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _prune_command(args, group: tuple[int, int] | None) -> None:
    from .distributed import shard

    model, tokenizer = _load(args.model)
    partial = _partial(Path(args.out))
    if group is not None:  # each rank its consecutive shard of the calibration windows; no checkpoints
        rank, world = group
        _check_loaded(args, model, tokenizer)
        calib = _calibration(args, tokenizer)
        if len(calib) < world:
            raise InvalidArgumentError(f"--calib-windows (--n) {args.n} gives fewer calibration windows than the "
                                       f"{world} processes")
        model, report = _prune(args, model, tokenizer, calib=calib[shard(len(calib), world, rank)], progress=rank == 0)
        if rank == 0:
            _finish(args, model, tokenizer, report, partial)
        return
    _check_loaded(args, model, tokenizer, checkpoint_dir=str(partial))
    if args.overwrite and partial.exists():
        print(f"spap: --overwrite: deleting the interrupted run in {partial}", file=sys.stderr)
        if partial.is_dir():
            shutil.rmtree(partial)
        else:
            partial.unlink()
    model, report = _prune(args, model, tokenizer, checkpoint_dir=str(partial), resume=args.resume)
    _finish(args, model, tokenizer, report, partial)


def _finish(args, model, tokenizer, report, partial: Path) -> None:
    """Evaluate (``--eval-windows``), save atomically, print the summary."""
    from .models import layer_widths, save_model, save_pruned

    if args.eval_windows:
        report.settings["wikitext_ppl"] = _wikitext_ppl(model, tokenizer, args.eval_windows, args.data_dir)
    widths = layer_widths(model)
    uniform = all(len(set(w)) == 1 for w in widths.values() if w is not None)
    _quiet(save_model if uniform else save_pruned, model, tokenizer, args.out, report=report)
    shutil.rmtree(partial, ignore_errors=True)
    if not uniform:
        print(f"spap: blocks have different widths; {args.out} holds spap_widths.json (load with spap.load_pruned "
              "or spap.load_model)", file=sys.stderr)
    print(report.summary())
    if args.eval_windows:
        print(f"WikiText-2 perplexity ({args.eval_windows} windows of {EVAL_SEQLEN}): "
              f"{report.settings['wikitext_ppl']:.3f}")
    print(f"saved to {args.out} (report: {Path(args.out) / 'spap_report.json'})")


def cmd_eval(args) -> None:
    from .eval import tokens_per_second

    model, tokenizer = _load(args.model, device=args.device or "cpu")
    _check_loaded(args, model, tokenizer)
    if args.tasks is not None:
        from .zeroshot import table, zeroshot

        results = zeroshot(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.batch_size,
                           device=args.device, data_dir=args.data_dir, progress=True)
        print(table(results))
        return
    if args.text != "wikitext":
        _check_text_length(args.text, tokenizer, args.seqlen)
    ppl = _wikitext_ppl(model, tokenizer, args.max_windows, args.data_dir, args.seqlen, args.text)
    speed = _quiet(tokens_per_second, model)
    print(json.dumps({"text": args.text, "perplexity": ppl, "windows": args.max_windows, "seqlen": args.seqlen,
                      "prefill_tokens_per_s": speed["prefill"], "decode_tokens_per_s": speed["decode"]}, indent=1))


def _check_text_length(file: str, tokenizer, seqlen: int) -> None:
    from .data import text_file

    tokens = len(tokenizer("\n\n".join(text_file(file)), add_special_tokens=False)["input_ids"])
    if tokens < seqlen:
        raise InvalidArgumentError(f"--text {file} holds {tokens} tokens, fewer than one window of --seqlen {seqlen}")


def cmd_info(args) -> None:
    import solvers

    from .adapters import get_adapter
    from .report import count_parameters
    from .units import widths

    model, tokenizer = _load(args.model)
    _check_loaded(args, model, tokenizer)
    a = get_adapter(model)
    print(f"model: {type(model).__name__} (model_type={model.config.model_type!r}, adapter {type(a).__name__})")
    per_block = widths(a)
    texts = []
    for key, what in (("mlp", "MLP"), ("experts", f"{a.experts(a.blocks()[0]).n if a.has_experts else 0} experts'")):
        w = per_block.get(key)  # a mixture of experts: the experts' width, and a dense MLP's where it has one
        if w is not None:
            texts.append(f"{what} width {w[0]}" if len(set(w)) == 1 else f"{what} widths {min(w)}-{max(w)} (per block: {w})")
    mlp_text = "; ".join(texts)
    print(f"blocks: {len(a.blocks())}; hidden {model.config.hidden_size}; {mlp_text}; "
          f"heads {a.n_heads} ({a.n_kv_heads} key-value, head_dim {a.head_dim})")
    print(f"parameters: {count_parameters(model):,}")
    print(f"structures: mlp, heads{'' if a.shrink_heads else ' (zeros stored: head_dim is derived)'}, mlp+heads, unstructured, N:M")
    print(f"methods: {', '.join(solvers.available_methods())}")


def cmd_demo(args) -> None:
    from .eval import tokens_per_second
    from .pipeline import forward_seconds
    from .report import count_parameters

    t0 = time.perf_counter()
    model, tokenizer = _load("smollm2")
    _check_loaded(args, model, tokenizer)
    print(f"SmolLM2-135M-Instruct: {count_parameters(model):,} parameters (loaded in {time.perf_counter() - t0:.1f} s)")
    dense_ppl = _wikitext_ppl(model, tokenizer, args.eval_windows, args.data_dir)
    dense_speed = _quiet(tokens_per_second, model)
    print(f"calibration: {args.n} windows of {args.seqlen} tokens from {args.calib} (seed {args.seed}); "
          f"pruning {args.sparsity:.0%} ({args.structure}) with {args.method}")
    calib = _calibration(args, tokenizer)
    # The floor: one plain pass of the same tokens through the dense blocks, as the prune runs them.
    floor = forward_seconds(model, calib, batch_size=args.batch_size, device=args.device)
    model, report = _prune(args, model, tokenizer, calib=calib)
    pruned_ppl = _wikitext_ppl(model, tokenizer, args.eval_windows, args.data_dir)
    pruned_speed = _quiet(tokens_per_second, model)
    print()
    print(report.summary())
    print(f"{'':<26}{'dense':>12}{'pruned':>12}")
    print(f"{f'WikiText-2 ppl ({args.eval_windows}x1024)':<26}{dense_ppl:>12.3f}{pruned_ppl:>12.3f}")
    print(f"{'parameters':<26}{report.params_before:>12,}{report.params_after:>12,}")
    print(f"{'prefill tokens/s':<26}{dense_speed['prefill']:>12.0f}{pruned_speed['prefill']:>12.0f}")
    print(f"{'decode tokens/s':<26}{dense_speed['decode']:>12.1f}{pruned_speed['decode']:>12.1f}")
    print(f"prune time {report.seconds:.1f} s = {report.seconds / floor:.1f} x one forward pass of the calibration "
          f"through the blocks ({floor:.1f} s; solver {report.solver_seconds:.1f} s); peak RSS {report.peak_memory['rss'] / 2**30:.2f} GiB; total {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """Run one command.  A user error (a bad argument or file, found before any work where it can be)
    prints one line, ``spap: error: ...``, on stderr and exits with code 2, as argparse's own errors do."""
    args = _parser().parse_args(argv)
    try:
        _validate(args)
        {"prune": cmd_prune, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo}[args.command](args)
    except USER_ERRORS as e:
        print(f"spap: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except RankFailed as e:  # another torchrun process failed: its own traceback says why
        print(f"spap: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    main(sys.argv[1:])
