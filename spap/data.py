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

from .checks import InvalidArgumentError

C4_FILE = "c4/c4-train.00000-of-01024.first1000.jsonl"
WIKITEXT_FILE = "wikitext-2-raw/test.rows.json"


class InvalidFileError(InvalidArgumentError):
    """A file given as an argument (a model's manifest, a calibration or data file) that cannot be read as
    what it should be; the message names the file and what is wrong, on one line."""


def data_dir(path: str | Path | None = None) -> Path:
    """Resolve the data directory: argument, then ``$SPAP_DATA_DIR``, then ``../shared/data``."""
    candidate = Path(path or os.environ.get("SPAP_DATA_DIR") or Path.cwd().parent / "shared" / "data")
    if not candidate.is_dir():
        raise FileNotFoundError(
            f"Data directory {candidate} not found; pass data_dir=... or set SPAP_DATA_DIR."
        )
    return candidate


def data_file(name: str, path: str | Path | None = None) -> Path:
    """``name`` (``C4_FILE`` or ``WIKITEXT_FILE``) inside the data directory; ``FileNotFoundError`` naming
    both when the directory or the file is missing."""
    directory = data_dir(path)
    if not (directory / name).is_file():
        raise FileNotFoundError(f"The data directory {directory} has no {name}.")
    return directory / name


def c4_documents(start: int = 0, stop: int | None = 500, *, path: str | Path | None = None) -> list[str]:
    """Texts of C4 documents ``[start:stop]`` (calibration: ``[:500]``; evaluation: ``[500:]``)."""
    return _json_lines(data_file(C4_FILE, path))[start:stop]


def wikitext_rows(*, path: str | Path | None = None) -> list[str]:
    """The 4,358 rows of the WikiText-2 raw test split."""
    return _json_rows(data_file(WIKITEXT_FILE, path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidFileError(f"{path} is not UTF-8 text (byte {e.start}).") from None
    except IsADirectoryError:
        raise InvalidFileError(f"{path} is a directory, not a text file.") from None


def _json_lines(path: Path) -> list[str]:
    """The ``"text"`` field of every line of a JSON-lines file (blank lines skipped)."""
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidFileError(f"{path}, line {number}: not JSON ({e.msg}); a .jsonl file holds one JSON "
                                   'object with a "text" string per line.') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InvalidFileError(f'{path}, line {number}: no "text" string; a .jsonl file holds one JSON object '
                                   'with a "text" string per line.')
        texts.append(record["text"])
    return texts


def _json_rows(path: Path) -> list[str]:
    """A JSON list of strings."""
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise InvalidFileError(f"{path} is not JSON ({e.msg}, line {e.lineno}); a .json file holds a list of "
                               "strings.") from None
    if not (isinstance(rows, list) and all(isinstance(r, str) for r in rows)):
        raise InvalidFileError(f"{path} must hold a JSON list of strings.")
    return rows


def random_windows(
    texts: Sequence[str], tokenizer, *, n: int, seqlen: int, seed: int = 0, used: list[int] | None = None
) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens, each cut at a random offset from a random document long
    enough to hold it (the SparseGPT/Wanda calibration recipe).  Returns a LongTensor ``(n, seqlen)``;
    ``used``, when given, receives the index of the document each window was cut from.
    """
    if n <= 0 or seqlen <= 0:
        raise InvalidArgumentError(f"The 'n' and 'seqlen' arguments must be positive. Got n={n}, seqlen={seqlen}.")
    gen = torch.Generator().manual_seed(seed)
    encoded: dict[int, list[int]] = {}
    windows = []
    tries = 0
    while len(windows) < n:
        tries += 1
        if tries > 100 * n:
            raise InvalidArgumentError(f"Too few documents hold more than {seqlen} tokens (found {len(windows)} "
                                       f"windows of {n} in {tries - 1} draws); lower 'seqlen' or give more text.")
        i = int(torch.randint(len(texts), (1,), generator=gen))
        if i not in encoded:
            encoded[i] = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        ids = encoded[i]
        if len(ids) <= seqlen:
            continue
        j = int(torch.randint(len(ids) - seqlen, (1,), generator=gen))
        windows.append(ids[j : j + seqlen])
        if used is not None:
            used.append(i)
    return torch.tensor(windows, dtype=torch.long)


def validation_documents(tokenizer, *, n: int = 64, seqlen: int = 1024, seed: int = 0,
                         path: str | Path | None = None) -> list[str]:
    """The validation split: the documents of C4 ``[:500]`` (the calibration split) that the calibration
    draw ``calibration_set("c4", tokenizer, n=n, seqlen=seqlen, seed=seed)`` cuts no window from.

    Defaults are chosen on it, never on the evaluation sets (WikiText-2 test, C4 ``[500:]``).
    """
    texts = c4_documents(0, 500, path=path)
    used: list[int] = []
    random_windows(texts, tokenizer, n=n, seqlen=seqlen, seed=seed, used=used)
    return [t for i, t in enumerate(texts) if i not in set(used)]


def text_file(path: str | Path) -> list[str]:
    """Documents of a UTF-8 file: ``.jsonl`` is JSON lines with a ``"text"`` field (the C4 format),
    ``.json`` a JSON list of strings (the WikiText rows format, joined into one document), anything else
    plain text cut into blank-line separated paragraphs.

    Raises ``FileNotFoundError`` for a missing file and :class:`InvalidFileError` (an
    ``InvalidArgumentError``) naming the file, and the line for ``.jsonl``, when it is not what its suffix
    says, is not UTF-8, or holds no text."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = _json_lines(path)
    elif path.suffix == ".json":
        docs = ["\n\n".join(_json_rows(path))]
    else:
        docs = [p for p in _read_text(path).split("\n\n") if p.strip()]
    if not any(d.strip() for d in docs):
        raise InvalidFileError(f"{path} holds no text.")
    return docs


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
            raise InvalidArgumentError(f"The 'source' argument must be 'c4', 'wikitext', a text file, a list of "
                                       f"strings or a datasets.Dataset. Got {source!r}, which is not a file.")
        texts = text_file(source)
    elif hasattr(source, "column_names") and "text" in getattr(source, "column_names", ()):
        texts = list(source["text"])
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source)
    else:
        raise InvalidArgumentError(f"The 'source' argument must be 'c4', 'wikitext', a text file, a list of strings "
                                   f"or a datasets.Dataset. Got {type(source).__name__}.")
    if not texts:
        raise InvalidArgumentError("The 'source' argument holds no text.")
    return random_windows(texts, tokenizer, n=n, seqlen=seqlen, seed=seed)
