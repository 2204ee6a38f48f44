"""Calibration and evaluation text: C4 JSON lines, WikiText rows, plain text files.

The data directory comes from the ``data_dir`` argument, else the ``SPAP_DATA_DIR`` environment
variable, else ``../shared/data`` next to the current directory.  Layout (see that folder's README)::

    c4/c4-train.00000-of-01024.first1000.jsonl     one JSON object per line, with "text"
    wikitext-2-raw/test.rows.json                   a JSON list of strings
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

C4_FILE = "c4/c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT_FILE = "wikitext-2-raw/test.rows.json"


def data_dir(path: str | Path | None = None) -> Path:
    """Resolve the data directory: argument, then ``$SPAP_DATA_DIR``, then ``../shared/data``."""
    candidate = Path(path or os.environ.get("SPAP_DATA_DIR") or Path.cwd().parent / "shared" / "data")
    if not candidate.is_dir():
        raise FileNotFoundError(
            f"Data directory {candidate} not found; pass data_dir=... or set SPAP_DATA_DIR."
        )
    return candidate


def c4_documents(start: int = 0, stop: int | None = 500, *, path: str | Path | None = None) -> list[str]:
    """Texts of C4 documents ``[start:stop]`` (calibration: ``[:500]``; evaluation: ``[500:]``)."""
    file = data_dir(path) / C4_FILE
    with open(file, encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh if line.strip()]
    return docs[start:stop]


def wikitext_rows(*, path: str | Path | None = None) -> list[str]:
    """The 4,358 rows of the WikiText-2 raw test split."""
    with open(data_dir(path) / WIKITEXT_FILE, encoding="utf-8") as fh:
        return json.load(fh)


def random_windows(
    texts: Sequence[str], tokenizer, *, n: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens, each cut at a random offset from a random document long
    enough to hold it (the SparseGPT/Wanda calibration recipe).  Returns a LongTensor ``(n, seqlen)``.
    """
    if n <= 0 or seqlen <= 0:
        raise ValueError(f"The 'n' and 'seqlen' arguments must be positive. Got n={n}, seqlen={seqlen}.")
    gen = torch.Generator().manual_seed(seed)
    encoded: dict[int, list[int]] = {}
    windows = []
    tries = 0
    while len(windows) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"Too few documents hold {seqlen} tokens; lower 'seqlen' or give more text.")
        i = int(torch.randint(len(texts), (1,), generator=gen))
        if i not in encoded:
            encoded[i] = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        ids = encoded[i]
        if len(ids) <= seqlen:
            continue
        j = int(torch.randint(len(ids) - seqlen, (1,), generator=gen))
        windows.append(ids[j : j + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def text_file(path: str | Path) -> list[str]:
    """Documents of a UTF-8 file: ``.jsonl`` is JSON lines with a ``"text"`` field (the C4 format),
    ``.json`` a JSON list of strings (the WikiText rows format, joined into one document), anything else
    plain text cut into blank-line separated paragraphs."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(rows, list) and all(isinstance(r, str) for r in rows)):
            raise ValueError(f"{path} must hold a JSON list of strings.")
        return ["\n\n".join(rows)]
    text = path.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()]


def calibration_set(source, tokenizer, *, n: int = 64, seqlen: int = 1024, seed: int = 0,
                    path: str | Path | None = None) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens (LongTensor ``(n, seqlen)``) from a named source.

    ``source``: ``"c4"`` (documents ``[:500]`` of the shared C4 sample, the calibration split),
    ``"wikitext"`` (the WikiText-2 test rows, joined: for experiments only, it is the evaluation set),
    a path to a file (``.jsonl`` C4-style JSON lines, ``.json`` list of rows, or plain text; see
    :func:`text_file`), a list of strings, or a Hugging Face ``datasets.Dataset`` with a
    ``"text"`` column.  Documents shorter than ``seqlen`` are skipped (as in SparseGPT).
    """
    if isinstance(source, str) and source == "c4":
        texts = c4_documents(0, 500, path=path)
    elif isinstance(source, str) and source == "wikitext":
        texts = ["\n\n".join(wikitext_rows(path=path))]
    elif isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ValueError(f"The 'source' argument must be 'c4', 'wikitext', a text file, a list of strings or a "
                             f"datasets.Dataset. Got {source!r}, which is not a file.")
        texts = text_file(source)
    elif hasattr(source, "column_names") and "text" in getattr(source, "column_names", ()):
        texts = list(source["text"])
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source)
    else:
        raise ValueError(f"The 'source' argument must be 'c4', 'wikitext', a text file, a list of strings or a "
                         f"datasets.Dataset. Got {type(source).__name__}.")
    if not texts:
        raise ValueError("The 'source' argument holds no text.")
    return random_windows(texts, tokenizer, n=n, seqlen=seqlen, seed=seed)
