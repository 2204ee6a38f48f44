"""Per-block checkpoints so an interrupted run resumes from the last finished block.

Layout of ``checkpoint_dir``: ``settings.json`` (the run's arguments; a resume must match them),
``block_{i}.pt`` (the finished block's state dict and kept channel/group indices) and ``state.pt`` (the
next block's inputs, their call arguments and the report rows so far).  Every file is written to a
temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .capture import share_equal, to_device
from .report import LayerRecord
from .units import keep as keep_units


class Interrupted(RuntimeError):
    """A run stopped before its last block; resume it with ``resume=True``."""


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def start(directory: str, settings: dict) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for old in list(d.glob("block_*.pt")) + [d / "state.pt"]:
        if old.exists():
            old.unlink()
    tmp = d / "settings.json.tmp"
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    os.replace(tmp, d / "settings.json")


def save_block(directory: str, index: int, block, kept: dict, hidden, kwargs, records) -> None:
    d = Path(directory)
    _atomic_save({"state_dict": {k: v.cpu() for k, v in block.state_dict().items()}, "kept": kept}, d / f"block_{index}.pt")
    _atomic_save({"next_block": index + 1, "hidden": [h.cpu() for h in hidden], "kwargs": kwargs,
                  "records": [r.__dict__ for r in records]}, d / "state.pt")


def load(directory: str, settings: dict, adapter, device: torch.device):
    """Restore finished blocks into the model; return ``(next_block, hidden, kwargs, records)``."""
    d = Path(directory)
    if not (d / "settings.json").is_file() or not (d / "state.pt").is_file():
        raise FileNotFoundError(f"No checkpoint to resume in {d}; run without resume=True first.")
    saved = json.loads((d / "settings.json").read_text())
    if saved != json.loads(json.dumps(settings, sort_keys=True)):
        raise ValueError(f"The checkpoint in {d} was made with different arguments: {saved}; now: {settings}.")
    state = torch.load(d / "state.pt", weights_only=False)
    blocks = adapter.blocks()
    for i in range(state["next_block"]):
        saved_block = torch.load(d / f"block_{i}.pt", weights_only=False)
        keep_units(adapter, blocks[i], saved_block["kept"])
        blocks[i].load_state_dict(saved_block["state_dict"])
    kwargs = share_equal(to_device(state["kwargs"], device))
    return state["next_block"], state["hidden"], kwargs, [LayerRecord(**r) for r in state["records"]]

