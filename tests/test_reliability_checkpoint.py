"""Kill-and-resume: a resume continues the same run bit for bit, refuses any other run, and never unpickles."""

from __future__ import annotations

import ast
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import spap
from solvers import InvalidArgumentError
from spap.checkpoint import CheckpointError

from .helpers import benchmark_module
from .test_pipeline import CONFIGS, _hooks, _ids

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str = "llama", seed: int = 0, layers: int = 4, **config):
    d = CONFIGS[name].to_dict()
    d.pop("layer_types", None)  # derived from the layer count
    cfg = type(CONFIGS[name]).from_dict({**d, "num_hidden_layers": layers, **config})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _prune(model, ckpt_dir, *, resume=False, stop=None, ids=None, sparsity=0.5, **kw):
    with _hooks(stop_after_blocks=stop):
        return spap.prune_layerwise(model, _ids() if ids is None else ids, sparsity, checkpoint_dir=str(ckpt_dir),
                                    resume=resume, progress=False, **kw)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the same run resumes bit-identically ---------------------------------------------------------------------

_REFERENCE: dict = {}


@pytest.mark.parametrize("stops", [(1,), (2,), (1, 1)], ids=lambda s: "stop" + "-".join(map(str, s)))
@pytest.mark.parametrize("name, structure", [("llama", "mlp"), ("qwen3", "heads"), ("gemma2", "unstructured")])
def test_resume_after_interruption_is_bit_identical(name, structure, stops, tmp_path):
    """Three blocks, interrupted after each finished block, and twice (gemma2 passes an attention mask)."""
    model = lambda: _model(name, layers=3)  # noqa: E731
    if (name, structure) not in _REFERENCE:
        _REFERENCE[name, structure] = spap.prune_layerwise(model(), _ids(), 0.5, structure=structure, progress=False)
    reference, ref_report = _REFERENCE[name, structure]
    with pytest.raises(spap.checkpoint.Interrupted):
        _prune(model(), tmp_path, stop=stops[0], structure=structure)
    for stop in stops[1:]:  # interrupted again while resuming
        with pytest.raises(spap.checkpoint.Interrupted):
            _prune(model(), tmp_path, resume=True, stop=stop, structure=structure)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.tmp"))
    resumed, report = _prune(model(), tmp_path, resume=True, structure=structure)
    assert _same_weights(resumed, reference)
    assert resumed.config.to_dict() == reference.config.to_dict()
    assert [(r.block, r.target, r.kept, r.relative_error) for r in report.layers] == \
           [(r.block, r.target, r.kept, r.relative_error) for r in ref_report.layers]


# --- any other run is refused, and nothing is touched ----------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 4-block llama run (mlp, 0.5) interrupted after block 1, and the interrupted model, left partly pruned
    (``restore_on_failure=False``: by default an interrupted run puts the dense model back)."""
    d = tmp_path_factory.mktemp("interrupted")
    model = _model()
    with pytest.raises(spap.checkpoint.Interrupted):
        _prune(model, d, stop=2, restore_on_failure=False)
    return d, model


REFUSED = {
    "other weights": (lambda: _model(seed=1), {}, ["the model weights differ", "tensors have other values"]),
    "other config": (lambda: _model(rms_norm_eps=1e-3), {},
                     ["the model config differs", "rms_norm_eps: 1e-06 saved, 0.001 now"]),
    "other shapes": (lambda: _model(intermediate_size=96), {}, ["the model weights differ", "intermediate_size"]),
    "other family": (lambda: _model("mistral"), {}, ["the model config differs", "'model_type': 'llama' saved"]),
    "other tokens": (_model, dict(ids=torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))),
                     ["the calibration tokens differ (another --seed, --calib, --n or --seqlen?)"]),
    "fewer tokens": (_model, dict(ids=_ids(6)),
                     ["the calibration tokens differ", "setting 'calib_tokens': 256 saved, 192 now"]),
    "sparsity": (_model, dict(sparsity=0.25), ["setting 'sparsity': 0.5 saved, 0.25 now"]),
    "method": (_model, dict(method="magnitude"), ["setting 'method': 'spap' saved, 'magnitude' now"]),
    "damp": (_model, dict(damp=0.1), ["setting 'damp': 0.01 saved, 0.1 now"]),
    "structure": (_model, dict(structure="heads"), ["setting 'structure': 'mlp' saved, 'heads' now"]),
    "batch size": (_model, dict(batch_size=4), ["setting 'batch_size': 8 saved, 4 now", "setting 'n_batches'"]),
    "propagation": (_model, dict(propagate="dense"), ["setting 'propagate': 'pruned' saved, 'dense' now"]),
    "gram dtype": (_model, dict(gram_dtype=torch.float64), ["setting 'gram_dtype'"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_resume_of_another_run_is_refused_naming_what_differs(case, interrupted):
    d, _ = interrupted
    make, kwargs, messages = REFUSED[case]
    model = make()
    dense = copy.deepcopy(model)
    before = _files(d)
    with pytest.raises(InvalidArgumentError, match="different arguments") as e:
        _prune(model, d, resume=True, **kwargs)
    for message in messages:
        assert message in str(e.value)
    assert _same_weights(model, dense) and model.config.to_dict() == dense.config.to_dict()
    assert _files(d) == before


def test_resume_with_the_partly_pruned_model_is_refused(interrupted):
    d, partly_pruned = interrupted
    with pytest.raises(InvalidArgumentError, match="not a partly pruned one"):
        _prune(partly_pruned, d, resume=True)


def test_resume_with_another_seed_or_model_on_the_command_line_is_refused(tiny_model_dir, tmp_path,
                                                                          monkeypatch, capsys):
    from spap import pipeline
    from spap.cli import main

    other = tmp_path / "other"  # the same model and tokenizer but for one weight
    shutil.copytree(tiny_model_dir / "model", other)
    model = transformers.AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1
    model.save_pretrained(other)
    argv = ["--out", str(tmp_path / "out"), "--calib", str(tiny_model_dir / "calib.txt"), "--n", "4", "--seqlen", "32",
            "--method", "magnitude"]
    monkeypatch.setattr(pipeline, "_HOOKS", pipeline._TestHooks(stop_after_blocks=1))
    with pytest.raises(spap.checkpoint.Interrupted):
        main(["prune", str(tiny_model_dir / "model"), *argv])
    monkeypatch.setattr(pipeline, "_HOOKS", pipeline._TestHooks())
    partial = tmp_path / "out.partial"
    before = _files(partial)

    def refused(args: list[str]) -> str:  # a user error: one error line on stderr, exit code 2
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("spap: error:")]
        assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1 and "different arguments" in errors[0]
        return errors[0]

    for extra, message in [(["--seed", "1"], "the calibration tokens differ (another --seed"),
                           (["--sparsity", "0.5"], "setting 'sparsity': 0.3 saved, 0.5 now")]:
        assert message in refused(["prune", str(tiny_model_dir / "model"), *argv, "--resume", *extra])
    assert "the model weights differ" in refused(["prune", str(other), *argv, "--resume"])
    assert _files(partial) == before and not (tmp_path / "out").exists()
    main(["prune", str(tiny_model_dir / "model"), *argv, "--resume"])  # the same run still resumes
    assert (tmp_path / "out" / "model.safetensors").is_file() and not partial.exists()


# --- checkpoints are data: nothing is unpickled, bad files are named ------------------------------------------


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for running a shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"next_block": 1, "payload": _Payload(marker)}, path)


def test_the_planted_payload_is_live(tmp_path):
    """The payload the next tests plant would run if anything unpickled it."""
    _plant_pickle(tmp_path / "state.pt", tmp_path / "marker")
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.fixture
def checkpoint(interrupted, tmp_path):
    """A copy of the interrupted run's checkpoint to tamper with."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for name, data in _files(interrupted[0]).items():
        (d / name).write_bytes(data)
    return d


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _copy(source: Path, target: Path) -> None:
    target.write_bytes(source.read_bytes())


def _old_format(d: Path) -> None:
    run = json.loads((d / "settings.json").read_text())
    (d / "settings.json").write_text(json.dumps(run["settings"]))


TAMPERED = {  # how -> (file named in the error, what the error says)
    "pickle as state.pt": (lambda d, m: ((d / "state.safetensors").unlink(), _plant_pickle(d / "state.pt", m)),
                           "state.pt", "never read"),
    "pickle as state.safetensors": (lambda d, m: _plant_pickle(d / "state.safetensors", m), "state.safetensors",
                                    "not a complete safetensors file"),
    "pickle as a block": (lambda d, m: _plant_pickle(d / "block_1.safetensors", m), "block_1.safetensors",
                          "not a complete safetensors file"),
    "pickle as settings.json": (lambda d, m: _plant_pickle(d / "settings.json", m), "settings.json", "not JSON"),
    "truncated state": (lambda d, m: _truncate(d / "state.safetensors"), "state.safetensors", "not a complete"),
    "truncated block": (lambda d, m: _truncate(d / "block_0.safetensors"), "block_0.safetensors", "not a complete"),
    "empty block": (lambda d, m: (d / "block_0.safetensors").write_bytes(b""), "block_0.safetensors", "not a complete"),
    "missing block": (lambda d, m: (d / "block_1.safetensors").unlink(), "block_1.safetensors", "missing"),
    "block 0 as block 1": (lambda d, m: _copy(d / "block_0.safetensors", d / "block_1.safetensors"),
                       "block_1.safetensors", "expected the block file of block 1"),
    "invalid JSON": (lambda d, m: (d / "settings.json").write_text("{\"format\": "), "settings.json", "not JSON"),
    "first format": (lambda d, m: _old_format(d), "settings.json", "no \"format\""),
    "other version": (lambda d, m: (d / "settings.json").write_text(
        (d / "settings.json").read_text().replace('"version": 2', '"version": 99')), "settings.json", "version 99"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_checkpoint_is_refused_naming_the_file_and_runs_nothing(case, checkpoint, tmp_path):
    tamper, name, reason = TAMPERED[case]
    marker = tmp_path / "marker"
    tamper(checkpoint, marker)
    model = _model()
    dense = copy.deepcopy(model)
    with pytest.raises(CheckpointError) as e:
        _prune(model, checkpoint, resume=True)
    assert str(checkpoint / name) in str(e.value) and reason in str(e.value)
    assert isinstance(e.value, ValueError)
    assert not marker.exists()
    assert _same_weights(model, dense)


def test_a_block_of_another_run_is_refused(checkpoint, tmp_path):
    other = tmp_path / "other"
    with pytest.raises(spap.checkpoint.Interrupted):
        _prune(_model(), other, stop=2, sparsity=0.25)
    (checkpoint / "block_1.safetensors").write_bytes((other / "block_1.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="block_1.safetensors .*belongs to another run"):
        _prune(_model(), checkpoint, resume=True)


def test_a_fresh_run_replaces_a_planted_checkpoint_without_reading_it(checkpoint, tmp_path):
    marker = tmp_path / "marker"
    for name in ("state.pt", "block_0.pt", "state.safetensors"):
        _plant_pickle(checkpoint / name, marker)
    with pytest.raises(spap.checkpoint.Interrupted):
        _prune(_model(), checkpoint, stop=1)
    assert not marker.exists()
    assert sorted(p.name for p in checkpoint.iterdir()) == ["block_0.safetensors", "settings.json", "state.safetensors"]


def test_the_layout_is_safetensors_and_json(interrupted):
    from safetensors import safe_open

    d, _ = interrupted
    run = json.loads((d / "settings.json").read_text())
    assert run["format"] == "spap-checkpoint" and run["version"] == 2
    assert set(run["fingerprint"]) == {"model_config", "model_weights", "calibration_tokens"}
    assert "model.layers.0.mlp.down_proj.weight" in run["fingerprint"]["model_weights"]
    with safe_open(d / "state.safetensors", framework="pt") as f:
        header = json.loads(f.metadata()["spap"])
        assert header["run_id"] == run["run_id"] and header["next_block"] == 2
        assert {h["tensor"] for h in header["hidden"]} <= set(f.keys())
    with safe_open(d / "block_1.safetensors", framework="pt") as f:
        assert "kept.mlp" in f.keys() and f.get_tensor("kept.mlp").numel() == 64


# --- the benchmark cache is data too ------------------------------------------------------------------------


def test_the_gram_cache_loads_data_and_refuses_a_pickle(tmp_path, monkeypatch):
    real_layers = benchmark_module("real_layers")
    monkeypatch.setenv("SPAP_CACHE", str(tmp_path))
    monkeypatch.setattr(real_layers, "capture", lambda *a: pytest.fail("the cache was not used"))
    path = real_layers.cache_path(2, 8, 0)
    data = {"grams": {"model.layers.0.mlp.down_proj": (torch.eye(3, dtype=torch.float64), torch.zeros(3), 16)},
            "weights": {"model.layers.0.mlp.down_proj": torch.ones(2, 3)}, "seconds": 1.5, "n": 2, "seqlen": 8}
    torch.save(data, path)
    assert real_layers.load(2, 8, 0)["grams"]["model.layers.0.mlp.down_proj"][2] == 16
    marker = tmp_path / "marker"
    _plant_pickle(path, marker)
    with pytest.raises(ValueError, match=f"cache file {path} is corrupt"):
        real_layers.load(2, 8, 0)
    assert not marker.exists()


# --- no pickle loading anywhere in the package or the benchmarks --------------------------------------------


def _unsafe_loads(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{where} torch.load without weights_only=True")
            if owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads", "Unpickler"):
                found.append(f"{where} {owner}.{node.func.attr}")
    return found


def test_nothing_loads_a_pickle_unsafely():
    assert _unsafe_loads(ROOT / "spap") + _unsafe_loads(ROOT / "solvers") + _unsafe_loads(ROOT / "benchmarks") == []
    assert (ROOT / "spap" / "checkpoint.py").read_text().count("torch.load") == 0
