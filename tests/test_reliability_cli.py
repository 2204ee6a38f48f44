"""Trustworthy runs (issue 15): bad command lines and bad files are refused with one line, before any work.

The catalogue runs ``spap.cli.main`` in-process on a tiny random Llama (``tiny_model_dir``, conftest.py)
with the calibration, the prune, the evaluation and the save replaced by functions that fail the test if
called.  Every case checks: exit code 2, one ``spap: error:`` line on stderr naming the argument or file,
no traceback, nothing loaded (``stage="args"``) or nothing calibrated (``stage="loaded"``), and no output
written.  The API catalogue checks the same for ``load_model``, ``save_model``/``save_pruned``/
``load_pruned`` and the data functions.  Then the leftovers: temporary directories of killed saves,
``OUT.partial``, fsync.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import solvers
import spap
from spap.cli import main
from spap.data import InvalidFileError

# ---------------------------------------------------------------------------------------------------
# Files the cases need, built in tmp_path by name


def _write(path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    return str(path)


def _copy_model(tiny, tmp, name="copy", without=(), config=None):
    d = tmp / name
    shutil.copytree(tiny / "model", d, ignore=shutil.ignore_patterns(*without))
    if config is not None:
        fields = json.loads((d / "config.json").read_text())
        fields.update(config)
        (d / "config.json").write_text(json.dumps(fields))
    return str(d)


def _fixture(name: str, tiny, tmp) -> str:
    """The path a case's ``{name}`` placeholder stands for."""
    lines = "\n".join(json.dumps({"text": f"w{i} " * 40}) for i in range(3))
    makers = {
        "model": lambda: str(tiny / "model"),
        "calib": lambda: str(tiny / "calib.txt"),
        "out": lambda: str(tmp / "out"),
        "missing": lambda: str(tmp / "no" / "such" / "thing"),
        "empty_dir": lambda: (tmp / "empty").mkdir() or str(tmp / "empty"),
        "config_only": lambda: _write(tmp / "config_only" / "config.json", (tiny / "model" / "config.json").read_text())
        and str(tmp / "config_only"),
        "corrupt_config": lambda: _write(tmp / "corrupt" / "config.json", "{not json")
        and _write(tmp / "corrupt" / "model.safetensors", b"") and str(tmp / "corrupt"),
        "mamba": lambda: _copy_model(tiny, tmp, "mamba", config={"model_type": "mamba"}),
        "no_tokenizer": lambda: _copy_model(tiny, tmp, "bare", without=("tokenizer*", "special_tokens_map.json")),
        "plain_file": lambda: _write(tmp / "weights.txt", "not a model"),
        "corrupt_widths": lambda: _copy_model(tiny, tmp, "widths") and _write(tmp / "widths" / "spap_widths.json", "{")
        and str(tmp / "widths"),
        "jsonl_without_text": lambda: _write(tmp / "docs.jsonl", lines + "\n" + json.dumps({"content": "w1 w2"})),
        "jsonl_not_json": lambda: _write(tmp / "broken.jsonl", "w1 w2 w3\n"),
        "empty_text": lambda: _write(tmp / "empty.txt", "\n\n  \n"),
        "json_not_list": lambda: _write(tmp / "rows.json", json.dumps({"rows": ["a"]})),
        "latin1": lambda: _write(tmp / "latin1.txt", "caf\xe9 w1 w2".encode("latin-1")),
        "short_text": lambda: _write(tmp / "short.txt", "w1 w2 w3 w4 w5"),
        "data_wikitext": lambda: _write(tmp / "data" / spap.data.WIKITEXT_FILE, json.dumps(["w1 w2"] * 10))
        and str(tmp / "data"),
        "empty_data": lambda: (tmp / "emptydata").mkdir() or str(tmp / "emptydata"),
        "file_parent": lambda: _write(tmp / "afile", "x") and str(tmp / "afile" / "out"),
    }
    return makers[name]()


def _argv(template: list[str], tiny, tmp) -> list[str]:
    out = []
    for arg in template:
        if arg.startswith("{") and arg.endswith("}"):
            arg = _fixture(arg[1:-1], tiny, tmp)
        out.append(arg)
    return out


PRUNE = ["prune", "{model}", "--out", "{out}", "--calib", "{calib}", "--n", "4", "--seqlen", "32"]

# (id, argv, fragments the message must hold, stage: "args" = refused before loading, "loaded" = after
# loading, before calibrating)
CLI_CASES = [
    ("prune-sparsity-above-1", PRUNE + ["--sparsity", "1.5"], ["--sparsity", "[0, 1)"], "args"),
    ("prune-sparsity-negative", PRUNE + ["--sparsity", "-0.1"], ["--sparsity"], "args"),
    ("prune-sparsity-nan", PRUNE + ["--sparsity", "nan"], ["--sparsity"], "args"),
    ("prune-damp-negative", PRUNE + ["--damp", "-1"], ["--damp", ">= 0"], "args"),
    ("prune-damp-inf", PRUNE + ["--damp", "inf"], ["--damp"], "args"),
    ("prune-eval-windows-negative", PRUNE + ["--eval-windows", "-1"], ["--eval-windows", ">= 0"], "args"),
    ("prune-device-tpu", PRUNE + ["--device", "tpu"], ["--device", "cpu, cuda or cuda:N", "'tpu'"], "args"),
    ("prune-device-cuda-99", PRUNE + ["--device", "cuda:99"], ["--device cuda:99"], "args"),
    ("prune-structure-unknown", PRUNE + ["--structure", "rows"], ["--structure", "'rows'"], "args"),
    ("prune-structure-n-above-m", PRUNE + ["--structure", "4:2"], ["--structure", "0 < N < M"], "args"),
    ("prune-sparsegpt-mlp", PRUNE + ["--method", "sparsegpt", "--structure", "mlp"],
     ["--method sparsegpt", "--structure mlp", "Unstructured"], "args"),
    ("prune-option-unknown", PRUNE + ["--option", "bogus=1"], ["--option", "bogus"], "args"),
    ("prune-option-no-equals", PRUNE + ["--option", "refit"], ["--option", "KEY=VALUE"], "args"),
    ("prune-n-zero", PRUNE + ["--n", "0"], ["--n must be positive"], "args"),
    ("prune-batch-size-zero", PRUNE + ["--batch-size", "0"], ["--batch-size"], "args"),
    ("prune-seed-negative", PRUNE + ["--seed", "-1"], ["--seed"], "args"),
    ("prune-seqlen-beyond-positions", PRUNE + ["--seqlen", "4096"], ["--seqlen", "4096", "128 positions"], "args"),
    ("prune-eval-windows-beyond-positions", PRUNE + ["--eval-windows", "2", "--data-dir", "{data_wikitext}"],
     ["--eval-windows", "1024", "128 positions"], "args"),
    ("prune-model-missing", ["prune", "{missing}", "--out", "{out}", "--calib", "{calib}"], ["model", "not found"],
     "args"),
    ("prune-model-empty-dir", ["prune", "{empty_dir}", "--out", "{out}", "--calib", "{calib}"], ["model", "is empty"],
     "args"),
    ("prune-model-no-weights", ["prune", "{config_only}", "--out", "{out}", "--calib", "{calib}"],
     ["model", "no weights"], "args"),
    ("prune-model-corrupt-config", ["prune", "{corrupt_config}", "--out", "{out}", "--calib", "{calib}"],
     ["config.json", "not valid JSON"], "args"),
    ("prune-model-unsupported", ["prune", "{mamba}", "--out", "{out}", "--calib", "{calib}"],
     ["'mamba'", "cannot prune", "llama"], "args"),
    ("prune-model-no-tokenizer", ["prune", "{no_tokenizer}", "--out", "{out}", "--calib", "{calib}"],
     ["model", "tokenizer"], "args"),
    ("prune-model-plain-file", ["prune", "{plain_file}", "--out", "{out}", "--calib", "{calib}"],
     ["weights.txt", "neither a model directory nor a .gguf file"], "args"),
    ("prune-model-corrupt-widths", ["prune", "{corrupt_widths}", "--out", "{out}", "--calib", "{calib}"],
     ["spap_widths.json", "not valid JSON"], "args"),
    ("prune-calib-missing", PRUNE[:4] + ["--calib", "{missing}"], ["--calib", "existing file"], "args"),
    ("prune-calib-jsonl-without-text", PRUNE[:4] + ["--calib", "{jsonl_without_text}"],
     ["--calib", "docs.jsonl", "line 4", '"text"'], "args"),
    ("prune-calib-jsonl-not-json", PRUNE[:4] + ["--calib", "{jsonl_not_json}"], ["--calib", "broken.jsonl", "line 1"],
     "args"),
    ("prune-calib-empty", PRUNE[:4] + ["--calib", "{empty_text}"], ["--calib", "empty.txt", "no text"], "args"),
    ("prune-calib-json-not-list", PRUNE[:4] + ["--calib", "{json_not_list}"],
     ["--calib", "rows.json", "list of strings"], "args"),
    ("prune-calib-not-utf8", PRUNE[:4] + ["--calib", "{latin1}"], ["--calib", "latin1.txt", "UTF-8"], "args"),
    ("prune-c4-data-dir-missing", PRUNE[:4] + ["--calib", "c4", "--data-dir", "{missing}"],
     ["--data-dir", "not a directory", "--calib c4"], "args"),
    ("prune-c4-data-dir-without-c4", PRUNE[:4] + ["--calib", "c4", "--data-dir", "{empty_data}"],
     ["--data-dir", spap.data.C4_FILE], "args"),
    ("prune-eval-data-dir-without-wikitext", PRUNE + ["--eval-windows", "1", "--data-dir", "{empty_data}"],
     ["--data-dir", spap.data.WIKITEXT_FILE, "--eval-windows"], "args"),
    ("prune-out-parent-is-a-file", ["prune", "{model}", "--out", "{file_parent}", "--calib", "{calib}"],
     ["--out", "is a file"], "args"),
    ("prune-resume-without-partial", PRUNE + ["--resume"], ["--resume", "no interrupted run"], "args"),
    ("prune-heads-every-kv-group", PRUNE + ["--structure", "heads", "--sparsity", "0.9"],
     ["sparsity", "all 2 key-value groups"], "loaded"),
    ("prune-nm-not-dividing-widths", PRUNE + ["--structure", "3:7"], ["structure", "'3:7'", "multiple of 7"], "loaded"),
    ("prune-full-metric-on-rows", PRUNE + ["--structure", "unstructured", "--output-metric", "full"],
     ["'output_metric'", "'diag'"], "loaded"),
    ("eval-max-windows-zero", ["eval", "{model}", "--text", "{calib}", "--max-windows", "0"], ["--max-windows"],
     "args"),
    ("eval-seqlen-one", ["eval", "{model}", "--text", "{calib}", "--seqlen", "1"], ["--seqlen", "at least 2"], "args"),
    ("eval-seqlen-beyond-positions", ["eval", "{model}", "--text", "{calib}", "--seqlen", "1024"],
     ["--seqlen", "128 positions"], "args"),
    ("eval-text-missing", ["eval", "{model}", "--text", "{missing}"], ["--text"], "args"),
    ("eval-text-jsonl-without-text", ["eval", "{model}", "--text", "{jsonl_without_text}"], ["--text", "docs.jsonl"],
     "args"),
    ("eval-device-tpu", ["eval", "{model}", "--text", "{calib}", "--device", "tpu"], ["--device"], "args"),
    ("eval-wikitext-data-dir-missing", ["eval", "{model}", "--data-dir", "{missing}"],
     ["--data-dir", "--text wikitext"], "args"),
    ("eval-model-empty-dir", ["eval", "{empty_dir}", "--text", "{calib}"], ["model", "is empty"], "args"),
    ("eval-text-shorter-than-a-window", ["eval", "{model}", "--text", "{short_text}", "--seqlen", "64"],
     ["--text", "short.txt", "5 tokens", "--seqlen 64"], "loaded"),
    ("info-model-missing", ["info", "{missing}"], ["model", "not found"], "args"),
    ("info-model-unsupported", ["info", "{mamba}"], ["'mamba'"], "args"),
    ("info-model-corrupt-config", ["info", "{corrupt_config}"], ["config.json"], "args"),
    ("demo-eval-windows-zero", ["demo", "--eval-windows", "0"], ["--eval-windows", "positive"], "args"),
    ("demo-damp-negative", ["demo", "--damp", "-0.5"], ["--damp"], "args"),
    ("demo-sparsity-one", ["demo", "--sparsity", "1"], ["--sparsity"], "args"),
    ("demo-device-tpu", ["demo", "--device", "tpu"], ["--device"], "args"),
    ("demo-data-dir-missing", ["demo", "--data-dir", "{missing}"], ["--data-dir", "not a directory"], "args"),
]


class _Forbidden(AssertionError):
    """Work that a refused command must not start."""


@pytest.fixture
def no_work(monkeypatch):
    """Make calibrating, pruning, evaluating and saving fail the test; count model loads."""
    loads = []
    real_load = spap.models.load_model

    def load_model(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    def forbidden(name):
        def fail(*args, **kwargs):
            raise _Forbidden(f"{name} was called")
        return fail

    monkeypatch.setattr(spap.models, "load_model", load_model)
    for module, name in ((spap.data, "calibration_set"), (spap.pipeline, "_run"), (spap.eval, "perplexity"),
                         (spap.models, "save_model"), (spap.models, "save_pruned")):
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    return loads


def _refused(argv, capsys) -> str:
    """Run the command line; return its one error line (and check exit code 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("spap: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("argv, fragments, stage", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_before_any_work(argv, fragments, stage, tiny_model_dir, tmp_path, no_work, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(spap.models, "smollm2_gguf_path", lambda: tmp_path / "smollm2.gguf")  # demo: installed or not
    argv = _argv(argv, tiny_model_dir, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _refused(argv, capsys)
    for fragment in fragments:
        assert fragment in line, line
    assert (len(no_work) == 0) == (stage == "args"), f"model loads: {len(no_work)}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_no_data_directory_at_all_is_named(tiny_model_dir, tmp_path, no_work, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../shared/data does not exist from here
    monkeypatch.delenv("SPAP_DATA_DIR", raising=False)
    line = _refused(["prune", str(tiny_model_dir / "model"), "--out", str(tmp_path / "out")], capsys)
    assert "--data-dir not given" in line and "$SPAP_DATA_DIR" in line and "--calib c4" in line
    assert not no_work


def test_an_existing_output_is_refused_and_kept(tiny_model_dir, tmp_path, no_work, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    line = _refused(_argv(PRUNE, tiny_model_dir, tmp_path), capsys)
    assert "--out" in line and "already exists" in line
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep" and not no_work


def test_cuda_without_a_gpu_is_named(tiny_model_dir, tmp_path, no_work, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(_argv(PRUNE, tiny_model_dir, tmp_path) + ["--device", "cuda"], capsys)
    assert "--device cuda" in line and "no CUDA device" in line


def test_argparse_errors_also_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "x", "--out", "y", "--sparsity", "lots"])
    assert e.value.code == 2 and "--sparsity" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(tiny_model_dir, tmp_path, monkeypatch):
    """Only user errors become one line; anything else propagates."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(spap.models, "load_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", str(tiny_model_dir / "model")])


# ---------------------------------------------------------------------------------------------------
# The API: load_model, save_model / save_pruned / load_pruned, data files


def _tiny_model():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _manifest(tiny, tmp, manifest) -> str:
    d = _copy_model(tiny, tmp, "pruned")
    _write(tmp / "pruned" / "spap_widths.json", manifest if isinstance(manifest, str) else json.dumps(manifest))
    return d


_WIDTHS = {"format": "spap-layer-widths", "version": 1, "model_type": "llama", "num_layers": 3,
           "intermediate_size": [128, 128, 128], "num_key_value_heads": [2, 2, 2]}

# (id, call(tiny_model_dir, tmp_path), error type, fragments of the message)
API_CASES = [
    ("load_model-missing", lambda t, p: spap.load_model(p / "nope"), FileNotFoundError, ["nope", "does not exist"]),
    ("load_model-missing-gguf", lambda t, p: spap.load_model(p / "m.gguf"), FileNotFoundError, ["m.gguf"]),
    ("load_model-empty-dir", lambda t, p: spap.load_model(_fixture("empty_dir", t, p)), FileNotFoundError,
     ["empty", "is empty"]),
    ("load_model-no-weights", lambda t, p: spap.load_model(_fixture("config_only", t, p)), FileNotFoundError,
     ["config_only", "no weights"]),
    ("load_model-corrupt-config", lambda t, p: spap.load_model(_fixture("corrupt_config", t, p)), InvalidFileError,
     ["config.json", "not valid JSON"]),
    ("load_model-config-without-model-type",
     lambda t, p: spap.load_model(_copy_model(t, p, "typeless") and _write(p / "typeless" / "config.json", "[1]")
                                  and p / "typeless"),
     InvalidFileError, ["config.json", "model_type"]),
    ("load_model-plain-file", lambda t, p: spap.load_model(_fixture("plain_file", t, p)), solvers.InvalidArgumentError,
     ["weights.txt"]),
    ("load_model-corrupt-widths", lambda t, p: spap.load_model(_fixture("corrupt_widths", t, p)), InvalidFileError,
     ["spap_widths.json"]),
    ("load_pruned-not-a-manifest", lambda t, p: spap.load_pruned(_manifest(t, p, {"format": "other"})),
     InvalidFileError, ["spap_widths.json", "version-1"]),
    ("load_pruned-widths-not-ints",
     lambda t, p: spap.load_pruned(_manifest(t, p, {**_WIDTHS, "intermediate_size": "a"})),
     InvalidFileError, ["spap_widths.json", "intermediate_size"]),
    ("load_pruned-zero-width",
     lambda t, p: spap.load_pruned(_manifest(t, p, {**_WIDTHS, "intermediate_size": [0, 1, 1]})),
     InvalidFileError, ["spap_widths.json", "positive"]),
    ("load_pruned-kv-length", lambda t, p: spap.load_pruned(_manifest(t, p, {**_WIDTHS, "num_key_value_heads": [1]})),
     InvalidFileError, ["spap_widths.json", "same length"]),
    ("load_pruned-block-count",
     lambda t, p: spap.load_pruned(_manifest(t, p, {**_WIDTHS, "intermediate_size": [64] * 5,
                                                     "num_key_value_heads": None})),
     InvalidFileError, ["spap_widths.json", "5 blocks", "builds 3"]),
    ("load_pruned-widths-exceed-config",
     lambda t, p: spap.load_pruned(_manifest(t, p, {**_WIDTHS, "intermediate_size": [999, 128, 128]})),
     InvalidFileError, ["spap_widths.json", "block 0"]),
    ("load_pruned-no-manifest", lambda t, p: spap.load_pruned(t / "model"), FileNotFoundError, ["spap_widths.json"]),
    ("save_model-existing-path", lambda t, p: spap.save_model(_tiny_model(), None, p), FileExistsError,
     ["already exists"]),
    ("save_model-parent-is-a-file", lambda t, p: spap.save_model(_tiny_model(), None, _fixture("file_parent", t, p)),
     solvers.InvalidArgumentError, ["afile", "is a file"]),
    ("save_pruned-existing-path", lambda t, p: spap.save_pruned(_tiny_model(), None, t), FileExistsError,
     ["already exists"]),
    ("text_file-jsonl-without-text", lambda t, p: spap.data.text_file(_fixture("jsonl_without_text", t, p)),
     InvalidFileError, ["docs.jsonl", "line 4", '"text"']),
    ("text_file-jsonl-not-json", lambda t, p: spap.data.text_file(_fixture("jsonl_not_json", t, p)), InvalidFileError,
     ["broken.jsonl", "line 1", "not JSON"]),
    ("text_file-json-not-list", lambda t, p: spap.data.text_file(_fixture("json_not_list", t, p)), InvalidFileError,
     ["rows.json", "list of strings"]),
    ("text_file-empty", lambda t, p: spap.data.text_file(_fixture("empty_text", t, p)), InvalidFileError,
     ["empty.txt", "no text"]),
    ("text_file-not-utf8", lambda t, p: spap.data.text_file(_fixture("latin1", t, p)), InvalidFileError,
     ["latin1.txt", "UTF-8"]),
    ("text_file-missing", lambda t, p: spap.data.text_file(p / "gone.txt"), FileNotFoundError, ["gone.txt"]),
    ("c4-data-dir-missing", lambda t, p: spap.data.c4_documents(path=p / "nowhere"), FileNotFoundError,
     ["nowhere", "SPAP_DATA_DIR"]),
    ("c4-file-missing", lambda t, p: spap.data.c4_documents(path=_fixture("empty_data", t, p)), FileNotFoundError,
     ["emptydata", spap.data.C4_FILE]),
    ("wikitext-not-json",
     lambda t, p: spap.data.wikitext_rows(path=_write(p / "d" / spap.data.WIKITEXT_FILE, "[1,") and p / "d"),
     InvalidFileError, ["test.rows.json", "not JSON"]),
    ("calibration-set-too-short", lambda t, p: spap.data.calibration_set(["w1 w2"], _tokenizer(t), n=2, seqlen=8),
     solvers.InvalidArgumentError, ["8 tokens", "'seqlen'"]),
]


def _tokenizer(tiny):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny / "model")


@pytest.mark.parametrize("call, error, fragments", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_files_with_one_line(call, error, fragments, tiny_model_dir, tmp_path):
    with pytest.raises(error) as e:
        call(tiny_model_dir, tmp_path)
    message = str(e.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_catalogue_size():
    assert len(CLI_CASES) + len(API_CASES) >= 30


# ---------------------------------------------------------------------------------------------------
# Leftovers: killed saves, OUT.partial, fsync, remote code

_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import transformers
    import spap

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    real = model.save_pretrained

    def save_then_die(directory, **kwargs):
        real(directory, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save: no except clause, no cleanup

    model.save_pretrained = save_then_die
    spap.save_model(model, None, sys.argv[1])
""")


def test_a_killed_save_is_cleaned_by_the_next_save_and_nothing_else_is(tmp_path):
    target = tmp_path / "pruned"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(spap.__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(target)], env=env, capture_output=True, timeout=300)
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    stale = [d for d in tmp_path.iterdir() if d.name.startswith(".pruned.")]
    assert len(stale) == 1 and (stale[0] / spap.models.SAVE_MARKER).is_file() and not target.exists()

    lookalike = tmp_path / ".pruned.user"  # the user's own directory with a similar name: no marker
    lookalike.mkdir()
    (lookalike / "notes.txt").write_text("mine")
    running = tmp_path / ".other.live"  # a save whose writer still runs (this process)
    running.mkdir()
    (running / spap.models.SAVE_MARKER).write_text(json.dumps(
        {"format": spap.models.SAVE_MARKER, "pid": os.getpid(), "host": __import__("socket").gethostname()}))

    spap.save_model(_tiny_model(), None, tmp_path / "second")
    assert not stale[0].exists()
    assert (lookalike / "notes.txt").read_text() == "mine" and running.is_dir()
    assert not (tmp_path / "second" / spap.models.SAVE_MARKER).exists()
    assert sorted(d.name for d in tmp_path.iterdir()) == [".other.live", ".pruned.user", "second"]


def test_saves_fsync_every_file_and_the_directories(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = spap.save_model(_tiny_model(), None, tmp_path / "out")
    files = [p for p in path.rglob("*") if p.is_file()]
    assert len(synced) == len(files) + 2  # every file, the temporary directory, then the parent after the rename
    if os.path.exists("/proc/self/fd"):
        assert {os.path.basename(s) for s in synced[:len(files)]} == {f.name for f in files}
        assert synced[-1] == os.path.realpath(tmp_path)


def test_an_interrupted_run_is_refused_without_resume_and_replaced_with_overwrite(tiny_model_dir, tmp_path, capsys):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "settings.json").write_text("{}")
    (partial / "block_0.pt").write_bytes(b"old")
    argv = _argv(PRUNE, tiny_model_dir, tmp_path) + ["--method", "magnitude"]

    line = _refused(argv, capsys)
    assert "out.partial" in line and "--resume" in line and "--overwrite" in line
    assert (partial / "block_0.pt").read_bytes() == b"old"  # never deleted without saying so

    line = _refused(argv + ["--overwrite", "--structure", "heads", "--sparsity", "0.9"], capsys)
    assert "key-value groups" in line and (partial / "block_0.pt").is_file()  # refused: the old run stays

    line = _refused(argv + ["--overwrite", "--resume"], capsys)
    assert "--resume" in line and "--overwrite" in line

    main(argv + ["--overwrite"])
    captured = capsys.readouterr()
    assert f"deleting the interrupted run in {partial}" in captured.err
    assert (tmp_path / "out" / "spap_report.json").is_file() and not partial.exists()


def test_models_load_without_remote_code(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        for name in ("from_pretrained", "from_config"):
            if not hasattr(cls, name):
                continue
            real = getattr(cls, name)

            def spy(*args, _real=real, _name=f"{cls.__name__}.{name}", **kwargs):
                seen.append((_name, kwargs.get("trust_remote_code", "absent")))
                return _real(*args, **kwargs)

            monkeypatch.setattr(cls, name, spy)
    model, tokenizer = spap.load_model(tiny_model_dir / "model")
    spap.save_pruned(model, tokenizer, tmp_path / "pruned")
    spap.load_pruned(tmp_path / "pruned")
    assert {name for name, _ in seen} >= {"AutoModelForCausalLM.from_pretrained", "AutoTokenizer.from_pretrained",
                                          "AutoConfig.from_pretrained", "AutoModelForCausalLM.from_config"}
    assert all(value is False for _, value in seen), seen


def test_resume_with_other_arguments_is_refused_before_calibrating(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from spap import pipeline

    argv = _argv(PRUNE, tiny_model_dir, tmp_path) + ["--method", "magnitude"]
    monkeypatch.setattr(pipeline, "_HOOKS", pipeline._TestHooks(stop_after_blocks=1))
    with pytest.raises(spap.checkpoint.Interrupted):
        main(argv)
    monkeypatch.setattr(pipeline, "_HOOKS", pipeline._TestHooks())

    def forbidden(*args, **kwargs):
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(spap.data, "calibration_set", forbidden)
    line = _refused(argv + ["--resume", "--sparsity", "0.5"], capsys)
    assert "sparsity" in line and (tmp_path / "out.partial").is_dir()
