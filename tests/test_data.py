"""Calibration from a datasets.Dataset and from local dataset files (spap.data.calibration_set)."""

from __future__ import annotations

import json

import pytest
import torch

from spap.data import InvalidFileError, calibration_set, text_file


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


DOCS = [f"document number {i} " * (5 + i) for i in range(20)]


def _windows(source, **kwargs):
    return calibration_set(source, CharTokenizer(), n=6, seqlen=32, seed=3, **kwargs)


def test_local_files_with_a_named_text_field(tmp_path):
    expected = _windows(DOCS)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    assert torch.equal(_windows(str(tmp_path / "docs.jsonl"), text_field="body"), expected)
    (tmp_path / "docs.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    assert torch.equal(_windows(tmp_path / "docs.json", text_field="body"), expected)
    assert text_file(tmp_path / "docs.json", "body") == DOCS
    with pytest.raises(InvalidFileError, match=r'docs\.jsonl, line 1: no "text" string.*\'body\', \'id\''):
        _windows(tmp_path / "docs.jsonl")
    with pytest.raises(InvalidFileError, match=r'docs\.json, object 0: no "title" string.*\'body\''):
        _windows(tmp_path / "docs.json", text_field="title")
    with pytest.raises(ValueError, match="'source'.*not a file"):
        _windows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="'text_field'"):
        _windows(DOCS, text_field="")


def test_a_duck_typed_dataset_is_refused():
    class LooksLikeADataset:
        column_names = ["text"]

        def __getitem__(self, key):
            return DOCS

    with pytest.raises(ValueError, match="'source'.*LooksLikeADataset"):
        _windows(LooksLikeADataset())


def test_datasets_dataset_parquet_and_saved_directory(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets library (the 'data' extra) is not installed")
    expected = _windows(DOCS)
    ds = datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))})
    assert torch.equal(_windows(ds, text_field="body"), expected)
    with pytest.raises(ValueError, match="'text_field'.*'text'.*not a column.*'body', 'n'"):
        _windows(ds)
    with pytest.raises(ValueError, match="Column 'n'.*strings.*row 0"):
        _windows(ds, text_field="n")
    with pytest.raises(ValueError, match="DatasetDict.*'train'.*one split"):
        _windows(datasets.DatasetDict({"train": ds}), text_field="body")
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    assert torch.equal(_windows(tmp_path / "docs.parquet", text_field="body"), expected)
    with pytest.raises(ValueError, match="'text_field'.*'text'.*docs.parquet.*'body'"):
        _windows(tmp_path / "docs.parquet")
    ds.save_to_disk(str(tmp_path / "saved"))
    assert torch.equal(_windows(tmp_path / "saved", text_field="body"), expected)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(InvalidFileError, match="broken.parquet is not a readable Parquet file"):
        _windows(tmp_path / "broken.parquet", text_field="body")


def test_parquet_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"needs the datasets library: pip install 'spap\[data\]'"):
        _windows(tmp_path / "docs.parquet")
    assert torch.equal(_windows(DOCS), _windows(DOCS))  # plain sources need nothing
