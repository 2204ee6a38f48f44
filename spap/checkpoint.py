"""Per-block checkpoints so an interrupted run resumes from the last finished block, and only the same run.

Layout of ``checkpoint_dir`` (format ``spap-checkpoint``, version 2; nothing in it is ever unpickled):

- ``settings.json``: the run (its settings and a fingerprint of its inputs, see :func:`describe`) and ``run_id``,
  a digest of both;
- ``block_{i}.safetensors``: block ``i`` after pruning, tensors ``state.NAME`` (its state dict) and ``kept.UNIT``
  (the kept channel/group indices);
- ``state.safetensors``: the next block's inputs, every block's call arguments and the report rows so far.  The
  header's ``"spap"`` metadata is JSON describing them, each tensor referenced by its key in the file.

Every block and state file names its ``run_id``, so files of two runs are never combined.  A resume whose
model, calibration tokens or settings differ from the checkpoint's is refused with a message naming what differs
(:class:`solvers.InvalidArgumentError`); a missing, truncated or foreign file raises :class:`CheckpointError`
naming it.  Every file is written to a temporary name, synced to disk and renamed, so a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .capture import share_equal, to_device
from .checks import InvalidArgumentError
from .report import LayerRecord
from .units import keep as keep_units

FORMAT = "spap-checkpoint"
VERSION = 2
RUN_FILE = "settings.json"
STATE_FILE = "state.safetensors"
_OLD_FILES = ("state.pt", "block_*.pt")  # version 1 (pickles): never read, removed by a fresh start


class Interrupted(RuntimeError):
    """A run stopped before its last block; resume it with ``resume=True``."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a spap checkpoint."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint file {path} is corrupt or not a spap checkpoint: {reason}")
        self.path = path


# --- what makes a run the same run ---------------------------------------------------------------------------


def describe(model: torch.nn.Module, batches: list[torch.Tensor], settings: dict) -> dict:
    """The run a checkpoint belongs to: ``settings`` and a fingerprint of the dense model and of the
    calibration tokens.

    The fingerprint holds the model's config (``to_dict()`` without private keys and the transformers
    version), a sha256 of every parameter and buffer (name -> digest of dtype, shape and bytes; tied tensors
    once) and a sha256 of the calibration token ids, row by row (so it does not depend on the batching,
    which is a setting).  Tensors are hashed one at a time from their own memory (a GPU tensor is copied to
    the CPU alone), so the model is never copied whole; the cost is in docs/pipeline.md.
    """
    weights = {name: _tensor_digest(t) for name, t in
               itertools.chain(model.named_parameters(), model.named_buffers())}
    tokens = hashlib.sha256()
    for batch in batches:
        for row in batch:
            tokens.update(len(row).to_bytes(8, "little"))
            tokens.update(_bytes(row.long()))
    fingerprint = {"model_config": _config_dict(model.config), "model_weights": weights,
                   "calibration_tokens": tokens.hexdigest()}
    return _canonical({"settings": settings, "fingerprint": fingerprint})


def _tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    h.update(_bytes(t))
    return h.hexdigest()


def _bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer, without a copy for a contiguous CPU tensor."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _config_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}


def _canonical(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _run_id(run: dict) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()


def _differences(saved: dict, now: dict) -> list[str]:
    """What differs between two runs, in words (empty when they are the same run)."""
    out = []
    fs, fn = saved.get("fingerprint", {}), now["fingerprint"]
    ws, wn = fs.get("model_weights", {}), fn["model_weights"]
    if ws != wn:
        changed = [k for k in wn if k in ws and ws[k] != wn[k]]
        parts = []
        if changed:
            parts.append(f"{len(changed)} of {len(wn)} tensors have other values, e.g. {changed[0]!r}")
        if set(ws) - set(wn):
            parts.append(f"the run's model has {sorted(set(ws) - set(wn))[:3]} and this one does not")
        if set(wn) - set(ws):
            parts.append(f"this model has {sorted(set(wn) - set(ws))[:3]} and the run's did not")
        out.append(f"the model weights differ ({'; '.join(parts)}; resume needs the dense model the run started "
                   "from, not a partly pruned one)")
    cs, cn = fs.get("model_config", {}), fn["model_config"]
    if cs != cn:
        keys = sorted(k for k in set(cs) | set(cn) if cs.get(k) != cn.get(k))
        shown = ", ".join(f"{k}: {cs.get(k)!r} saved, {cn.get(k)!r} now" for k in keys[:3])
        out.append(f"the model config differs ({shown}{', ...' if len(keys) > 3 else ''})")
    if fs.get("calibration_tokens") != fn["calibration_tokens"]:
        out.append("the calibration tokens differ (another --seed, --calib, --n or --seqlen?)")
    ss, sn = saved.get("settings", {}), now["settings"]
    for k in sorted(set(ss) | set(sn)):
        if ss.get(k) != sn.get(k):
            out.append(f"setting {k!r}: {ss.get(k)!r} saved, {sn.get(k)!r} now")
    return out


# --- writing -------------------------------------------------------------------------------------------------


def start(directory: str, run: dict) -> None:
    """Begin a fresh checkpoint of ``run`` (from :func:`describe`) in ``directory``, removing any older one."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # the state first: a crash in between must not pair an old state with the new run file
    for pattern in (STATE_FILE, "block_*.safetensors", *_OLD_FILES):
        for old in d.glob(pattern):
            old.unlink()
    record = {"format": FORMAT, "version": VERSION, "run_id": _run_id(run), **run}
    _atomic(d / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True)))


def save_block(directory: str, index: int, block, kept: dict, hidden, kwargs, records, dense_hidden=None) -> None:
    """Save block ``index`` (pruned) and the state after it: the next inputs (and the dense model's, for
    the error-correcting target), all call arguments, the rows."""
    d = Path(directory)
    run_id = _read_run(d)["run_id"]
    tensors = {f"state.{k}": v for k, v in block.state_dict().items()}
    tensors.update({f"kept.{k}": v for k, v in kept.items()})
    _save_tensors(d / f"block_{index}.safetensors", tensors, {"kind": "block", "block": index, "run_id": run_id})
    table: dict[int, tuple[str, torch.Tensor]] = {}
    header = {"kind": "state", "run_id": run_id, "next_block": index + 1,
              "hidden": [_encode(h, table) for h in hidden], "kwargs": _encode(kwargs, table),
              "dense_hidden": None if dense_hidden is None else [_encode(h, table) for h in dense_hidden],
              "records": [dict(r.__dict__) for r in records]}
    _save_tensors(d / STATE_FILE, dict(table.values()), header)


def _encode(x: Any, table: dict) -> Any:
    """``x`` as JSON, each tensor replaced by ``{"tensor": key}`` (one key per tensor object)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in table:
            table[id(x)] = (f"t{len(table)}", x)
        return {"tensor": table[id(x)][0]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (tuple, list)):
        return {type(x).__name__: [_encode(v, table) for v in x]}
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {"dict": {k: _encode(v, table) for k, v in x.items()}}
    raise TypeError(f"A checkpoint holds tensors, None, bools, numbers, strings, tuples, lists and dicts with string "
                    f"keys; a block's call arguments hold a {type(x).__name__}.")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    plain, storages = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        v = v.clone() if ptr in storages else v.contiguous()  # safetensors refuses tensors that share memory
        if ptr is not None:
            storages.add(ptr)
        plain[k] = v
    metadata = {"spap": json.dumps({"format": FORMAT, "version": VERSION, **header})}
    _atomic(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- reading -------------------------------------------------------------------------------------------------


def load(directory: str, run: dict, adapter, device: torch.device):
    """Restore finished blocks into the model; return ``(next_block, hidden, kwargs, records, dense_hidden)``
    (``dense_hidden`` None unless the run fits the dense model's outputs).

    ``run`` (from :func:`describe` on the dense model) must be the checkpoint's run, else
    :class:`solvers.InvalidArgumentError` names what differs; every file is read and checked before the
    model is touched.
    """
    d = Path(directory)
    saved = _saved_run(d)
    _refuse_if_different(d, _differences(saved, run))
    state_path = d / STATE_FILE
    if not state_path.is_file():
        old = [p.name for pattern in _OLD_FILES for p in d.glob(pattern)]
        if old:
            raise CheckpointError(d / old[0], "a checkpoint of spap's first format (pickle), which is never read "
                                  "since loading it could run code; run without resume=True to start over")
        raise FileNotFoundError(f"No finished block to resume in {d}; run without resume=True to start over.")
    tensors, header = _read_tensors(state_path, "state", saved["run_id"])
    try:
        next_block = header["next_block"]
        if not isinstance(next_block, int) or not 0 < next_block <= len(adapter.blocks()):
            raise ValueError(f"next_block {next_block!r} is not a block of this model")
        cache: dict[str, torch.Tensor] = {}
        hidden = [_decode(h, tensors, cache) for h in header["hidden"]]
        kwargs = _decode(header["kwargs"], tensors, cache)
        records = [LayerRecord(**r) for r in header["records"]]
        dense = header.get("dense_hidden")
        dense_hidden = None if dense is None else [_decode(h, tensors, cache) for h in dense]
        if dense_hidden is not None and len(dense_hidden) != len(hidden):
            raise ValueError("the dense stream does not hold one tensor per batch")
        if not (isinstance(kwargs, list) and len(kwargs) == len(adapter.blocks())
                and all(isinstance(kw, list) and len(kw) == len(hidden) for kw in kwargs)):
            raise ValueError("the call arguments are not one list per block and batch")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(state_path, f"bad state ({type(e).__name__}: {e})") from None
    paths = [d / f"block_{i}.safetensors" for i in range(next_block)]
    for i, path in enumerate(paths):  # check every header before touching the model
        _read_header(path, "block", saved["run_id"], block=i)
    blocks = adapter.blocks()
    for i, path in enumerate(paths):
        block_tensors, _ = _read_tensors(path, "block", saved["run_id"], block=i)
        kept = {k[5:]: v for k, v in block_tensors.items() if k.startswith("kept.")}
        state = {k[6:]: v for k, v in block_tensors.items() if k.startswith("state.")}
        try:
            keep_units(adapter, blocks[i], kept)
            blocks[i].load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise CheckpointError(path, f"does not fit block {i} ({type(e).__name__}: {e})") from None
    kwargs = share_equal(to_device(kwargs, device))
    return next_block, hidden, kwargs, records, dense_hidden


def check_settings(directory: str, settings: dict) -> None:
    """Refuse to resume the checkpoint in ``directory`` when one of ``settings`` (a subset of the run's
    settings, those known before calibrating) differs from the saved run's, naming it; the model and the
    calibration tokens are checked by :func:`load`."""
    d = Path(directory)
    saved = _saved_run(d)["settings"]
    now = _canonical(settings)
    _refuse_if_different(d, [f"setting {k!r}: {saved.get(k)!r} saved, {now[k]!r} now"
                             for k in sorted(now) if saved.get(k) != now[k]])


def _saved_run(d: Path) -> dict:
    if not (d / RUN_FILE).is_file():
        raise FileNotFoundError(f"No checkpoint to resume in {d}; run without resume=True first.")
    return _read_run(d)


def _refuse_if_different(d: Path, differences: list[str]) -> None:
    if differences:
        raise InvalidArgumentError(
            f"The checkpoint in {d} was made with different arguments, so it cannot be resumed: "
            + "; ".join(differences) + ". Resume with the same model, calibration and settings, or run without "
            "resume=True to start over.")


def _read_run(d: Path) -> dict:
    path = d / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "the file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not JSON ({e})") from None
    _check_format(path, record)
    if not isinstance(record.get("run_id"), str) or not isinstance(record.get("settings"), dict) \
            or not isinstance(record.get("fingerprint"), dict):
        raise CheckpointError(path, "no run_id, settings or fingerprint")
    return record


def _check_format(path: Path, header: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(path, f"no \"format\": {FORMAT!r} field (a file of spap's first checkpoint format, "
                                    "or another program's)")
    if header.get("version") != VERSION:
        raise CheckpointError(path, f"format version {header.get('version')!r}; this spap reads version {VERSION}")


def _read_header(path: Path, kind: str, run_id: str, block: int | None = None) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(path, "the file is missing") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"not a complete safetensors file ({e})") from None
    try:
        header = json.loads(metadata["spap"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"no spap header ({type(e).__name__}: {e})") from None
    _check_format(path, header)
    if header.get("kind") != kind or (block is not None and header.get("block") != block):
        raise CheckpointError(path, f"expected the {kind} file{'' if block is None else f' of block {block}'}")
    if header.get("run_id") != run_id:
        raise CheckpointError(path, f"it belongs to another run than {path.parent / RUN_FILE}")
    return header


def _read_tensors(path: Path, kind: str, run_id: str, block: int | None = None) -> tuple[dict, dict]:
    header = _read_header(path, kind, run_id, block)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, header
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"unreadable tensors ({e})") from None


def _decode(x: Any, tensors: dict, cache: dict) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict) and len(x) == 1:
        (tag, value), = x.items()
        if tag == "tensor":
            if value not in cache:
                cache[value] = tensors[value]
            return cache[value]
        if tag == "tuple":
            return tuple(_decode(v, tensors, cache) for v in value)
        if tag == "list":
            return [_decode(v, tensors, cache) for v in value]
        if tag == "dict":
            return {k: _decode(v, tensors, cache) for k, v in value.items()}
    raise ValueError(f"unknown entry {str(x)[:80]}")
