"""Calibration and evaluation text: C4 JSON lines, WikiText rows, local files, ``datasets.Dataset``.

The data directory comes from the ``data_dir`` argument, else the ``SPAP_DATA_DIR`` environment
variable, else ``../shared/data`` next to the current directory.  Layout (see that folder's README)::

    c4/c4-train.00000-of-01024.first1000.jsonl     one JSON object per line, with "text"
    wikitext-2-raw/test.rows.json                   a JSON list of strings
"""

from __future__ import annotations

import json
import os
import sys
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


def _json_lines(path: Path, text_field: str = "text") -> list[str]:
    """The ``text_field`` string of every line of a JSON-lines file (blank lines skipped)."""
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidFileError(f"{path}, line {number}: not JSON ({e.msg}); a .jsonl file holds one JSON "
                                   f'object with a "{text_field}" string per line.') from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = f" (its keys: {', '.join(map(repr, record))})" if isinstance(record, dict) else ""
            raise InvalidFileError(f'{path}, line {number}: no "{text_field}" string{keys}; a .jsonl file holds one '
                                   f'JSON object with a "{text_field}" string per line (text_field names the key).')
        texts.append(record[text_field])
    return texts


def _json_rows(path: Path) -> list[str]:
    """A JSON list of strings."""
    rows = _json(path)
    if not (isinstance(rows, list) and all(isinstance(r, str) for r in rows)):
        raise InvalidFileError(f"{path} must hold a JSON list of strings.")
    return rows


def _json(path: Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise InvalidFileError(f"{path} is not JSON ({e.msg}, line {e.lineno}); a .json file holds a list of "
                               "strings, or a list of objects with a text field.") from None


def _json_documents(path: Path, text_field: str) -> list[str]:
    """A ``.json`` file: a list of strings (rows of one document, the WikiText format, joined) or a list of
    objects, each a document with a ``text_field`` string (what ``Dataset.to_json(lines=False)`` writes)."""
    rows = _json(path)
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        for number, r in enumerate(rows):
            if not isinstance(r.get(text_field), str):
                raise InvalidFileError(f'{path}, object {number}: no "{text_field}" string (its keys: '
                                       f"{', '.join(map(repr, r))}); text_field names the key.")
        return [r[text_field] for r in rows]
    if not (isinstance(rows, list) and all(isinstance(r, str) for r in rows)):
        raise InvalidFileError(f'{path} must hold a JSON list of strings, or a list of objects with a "{text_field}" '
                               "string.")
    return ["\n\n".join(rows)]


def _dataset_column(dataset, text_field: str, what: str) -> list[str]:
    """The ``text_field`` column of a ``datasets.Dataset``, every value a string."""
    if text_field not in dataset.column_names:
        raise InvalidArgumentError(f"The 'text_field' argument is {text_field!r}, which is not a column of {what}; "
                                   f"its columns: {', '.join(map(repr, dataset.column_names))}.")
    texts = dataset[text_field]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise InvalidArgumentError(f"Column {text_field!r} of {what} must hold strings; row {bad} holds a "
                                   f"{type(texts[bad]).__name__}.")
    return list(texts)


def _datasets(purpose: str):
    """The ``datasets`` library, or an error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise InvalidArgumentError(f"{purpose} needs the datasets library: pip install 'spap[data]' "
                                   "(or pip install datasets).") from None
    return datasets


def _parquet(path: Path, text_field: str) -> list[str]:
    datasets = _datasets(f"Reading {path}")
    try:
        dataset = datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow's errors: not a parquet file, truncated, ...
        raise InvalidFileError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())[:200]}).") from None
    return _dataset_column(dataset, text_field, str(path))


def _saved_dataset(path: Path, text_field: str) -> list[str]:
    """A directory written by ``Dataset.save_to_disk``."""
    datasets = _datasets(f"Reading the dataset directory {path}")
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:
        raise InvalidFileError(f"{path} is not a dataset saved by Dataset.save_to_disk "
                               f"({' '.join(str(e).split())[:200]}).") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise InvalidFileError(f"{path} holds a DatasetDict with splits {', '.join(map(repr, dataset))}; pass the "
                               "directory of one split.")
    return _dataset_column(dataset, text_field, str(path))


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` (or ``DatasetDict``'s)."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


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


def text_file(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a local file (or saved dataset):

    - ``.jsonl``: one JSON object per line, its ``text_field`` string a document (the C4 format);
    - ``.json``: a list of strings (the WikiText rows format, joined into one document), or a list of
      objects, each a document with a ``text_field`` string;
    - ``.parquet``: the ``text_field`` column, one document per row (needs ``datasets``, the ``data``
      extra);
    - a directory written by ``datasets.Dataset.save_to_disk``: its ``text_field`` column (``datasets``);
    - anything else: UTF-8 plain text, cut into blank-line separated paragraphs.

    Raises ``FileNotFoundError`` for a missing file and :class:`InvalidFileError` (an
    ``InvalidArgumentError``) naming the file, and the line or object for JSON, when it is not what its
    suffix says, lacks the field (the message lists the keys or columns there are), is not UTF-8, or
    holds no text."""
    path = Path(path)
    if is_saved_dataset(path):
        docs = _saved_dataset(path, text_field)
    elif path.suffix == ".jsonl":
        docs = _json_lines(path, text_field)
    elif path.suffix == ".json":
        docs = _json_documents(path, text_field)
    elif path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"No such file: {path}")
        docs = _parquet(path, text_field)
    else:
        docs = [p for p in _read_text(path).split("\n\n") if p.strip()]
    if not any(d.strip() for d in docs):
        raise InvalidFileError(f"{path} holds no text.")
    return docs


_SOURCES = "'c4', 'wikitext', a file (.jsonl, .json, .parquet, text), a saved dataset directory, a list of strings " \
           "or a datasets.Dataset"


def calibration_set(source, tokenizer, *, n: int = 64, seqlen: int = 1024, seed: int = 0,
                    path: str | Path | None = None, text_field: str = "text") -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens (LongTensor ``(n, seqlen)``) from a named source.

    ``source``: ``"c4"`` (documents ``[:500]`` of the shared C4 sample, the calibration split),
    ``"wikitext"`` (the WikiText-2 test rows, joined: for experiments only, it is the evaluation set),
    a path to a local file or saved dataset (:func:`text_file`: ``.jsonl``, ``.json``, ``.parquet``, a
    ``Dataset.save_to_disk`` directory, plain text), a list of strings, or a ``datasets.Dataset`` (one
    document per row).  ``text_field`` names the documents' field in ``.jsonl``/``.json`` objects and the
    column of a Parquet file or dataset (default ``"text"``); a missing one is refused naming it and the
    fields there are.  A ``DatasetDict`` is refused: pass one split (``dd["train"]``).  Documents shorter
    than ``seqlen`` are skipped (as in SparseGPT).
    """
    if not isinstance(text_field, str) or not text_field:
        raise InvalidArgumentError(f"The 'text_field' argument must be a non-empty string. Got {text_field!r}.")
    if isinstance(source, str) and source == "c4":
        texts = c4_documents(0, 500, path=path)
    elif isinstance(source, str) and source == "wikitext":
        texts = ["\n\n".join(wikitext_rows(path=path))]
    elif isinstance(source, (str, Path)):
        if not (Path(source).is_file() or is_saved_dataset(source)):
            raise InvalidArgumentError(f"The 'source' argument must be {_SOURCES}. Got {source!r}, which is not a "
                                       "file or dataset directory.")
        texts = text_file(source, text_field)
    elif _is_dataset(source):
        texts = _dataset_column(source, text_field, f"the {type(source).__name__} 'source'")
    elif _is_dataset_dict(source):
        raise InvalidArgumentError(f"The 'source' argument is a DatasetDict with splits {', '.join(map(repr, source))}; "
                                   "pass one split, e.g. source['train'].")
    elif isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        texts = list(source)
    else:
        raise InvalidArgumentError(f"The 'source' argument must be {_SOURCES}. Got {type(source).__name__}.")
    if not texts:
        raise InvalidArgumentError("The 'source' argument holds no text.")
    return random_windows(texts, tokenizer, n=n, seqlen=seqlen, seed=seed)


def _is_dataset(source) -> bool:
    """A ``datasets.Dataset``.  Checked by type, without importing ``datasets``: an object of its types
    exists only once the library is imported."""
    library = sys.modules.get("datasets")
    return library is not None and isinstance(source, library.Dataset)


def _is_dataset_dict(source) -> bool:
    library = sys.modules.get("datasets")
    return library is not None and isinstance(source, library.DatasetDict)
