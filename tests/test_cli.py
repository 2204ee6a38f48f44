"""The command line: argument checks happen before any model is loaded (the catalogue of refused inputs is
tests/test_reliability_cli.py); prune, eval, info and resume on a tiny checkpoint (``tiny_model_dir``, in
conftest.py)."""

from __future__ import annotations

import pytest


def test_cli_rejects_bad_arguments_before_loading(capsys):
    from spap.cli import main

    for argv, message in [
        (["prune", "smollm2", "--out", "x", "--sparsity", "1.5"], "--sparsity"),
        (["prune", "smollm2", "--out", "x", "--structure", "rows"], "--structure"),
        (["demo", "--n", "0"], "--n"),
        (["prune", "smollm2", "--out", "x", "--option", "bogus=1"], "--option"),
        (["prune", "smollm2", "--out", "x", "--option", "no-equals-sign"], "--option"),
        (["prune", "no/such/model", "--out", "x"], "not found"),
        (["prune", "smollm2", "--out", "x", "--calib", "no/such/file.txt"], "--calib"),
        (["prune", "smollm2", "--out", "x", "--resume"], "no interrupted run"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_prune_refuses_an_existing_output(tmp_path, capsys):
    from spap.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prune", "smollm2", "--out", str(tmp_path)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err


def test_prune_eval_info_on_a_tiny_checkpoint(tiny_model_dir, tmp_path, capsys):
    import json

    import torch
    import transformers

    from spap.cli import main

    out = tmp_path / "pruned"
    main(["prune", str(tiny_model_dir / "model"), "--out", str(out), "--structure", "mlp+heads", "--sparsity", "0.5",
          "--calib", str(tiny_model_dir / "calib.txt"), "--n", "4", "--seqlen", "32", "--method", "magnitude"])
    printed = capsys.readouterr().out
    assert "parameters" in printed and "saved to" in printed
    report = json.loads((out / "spap_report.json").read_text())
    assert report["settings"]["structure"] == "mlp+heads" and len(report["layers"]) == 6
    assert not (tmp_path / "pruned.partial").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 64 and model.config.num_key_value_heads == 1
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(10)[None]).logits).all()

    main(["info", str(out)])
    assert "MLP width 64" in capsys.readouterr().out
    main(["eval", str(out), "--seqlen", "16", "--max-windows", "2", "--text", str(tiny_model_dir / "calib.txt")])
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 2 and result["perplexity"] > 1


def test_prune_resumes_from_the_partial_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    import transformers

    import spap
    from spap import pipeline
    from spap.cli import main

    argv = ["--calib", str(tiny_model_dir / "calib.txt"), "--n", "4", "--seqlen", "32", "--sparsity", "0.25"]
    main(["prune", str(tiny_model_dir / "model"), "--out", str(tmp_path / "reference"), *argv])
    monkeypatch.setattr(pipeline, "_HOOKS", pipeline._TestHooks(stop_after_blocks=1))
    with pytest.raises(spap.checkpoint.Interrupted):
        main(["prune", str(tiny_model_dir / "model"), "--out", str(tmp_path / "resumed"), *argv])
    assert (tmp_path / "resumed.partial").is_dir() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(pipeline, "_HOOKS", pipeline._TestHooks())
    main(["prune", str(tiny_model_dir / "model"), "--out", str(tmp_path / "resumed"), "--resume", *argv])
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_with_an_allocation_saves_per_block_widths(tiny_model_dir, tmp_path, capsys):
    import json

    import torch

    from spap.cli import main
    from spap.models import load_model

    out = tmp_path / "pruned"
    main(["prune", str(tiny_model_dir / "model"), "--out", str(out), "--sparsity", "0.5", "--allocation", "owl",
          "--calib", str(tiny_model_dir / "calib.txt"), "--n", "4", "--seqlen", "32"])
    assert "allocation" in capsys.readouterr().out
    report = json.loads((out / "spap_report.json").read_text())
    widths = json.loads((out / "spap_widths.json").read_text())["intermediate_size"]
    assert report["settings"]["allocation"]["name"] == "owl"
    assert [128 - w for w in widths] == report["allocation"]["mlp"] and sum(widths) == 3 * 64
    model, _ = load_model(out)
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == widths
    main(["info", str(out)])
    assert (f"MLP widths {min(widths)}-{max(widths)}" if len(set(widths)) > 1 else f"MLP width {widths[0]}") \
        in capsys.readouterr().out
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(10)[None]).logits).all()


def test_commands_print_no_transformers_chatter(tiny_model_dir, tmp_path):
    """`spap prune` (load, FLAP prune with bias compensation, save) and `spap eval` (load, perplexity,
    generation) in a fresh process print spap's own lines only: no transformers progress bar, log line or
    warning on stdout or stderr."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE"))}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "pruned"
    noise = re.compile(r"transformers|Loading weights|Writing model shards|Warning|deprecat|warn", re.IGNORECASE)
    for argv in (["prune", str(tiny_model_dir / "model"), "--out", str(out), "--method", "flap", "--structure",
                  "mlp+heads", "--calib", str(tiny_model_dir / "calib.txt"), "--n", "4", "--seqlen", "32"],
                 ["eval", str(out), "--seqlen", "16", "--max-windows", "1", "--text", str(tiny_model_dir / "calib.txt")]):
        done = subprocess.run([sys.executable, "-m", "spap", *argv], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        lines = [line for text in (done.stdout, done.stderr) for line in re.split(r"[\r\n]+", text) if line.strip()]
        assert lines and not [line for line in lines if noise.search(line)]
        assert all(line.lstrip().startswith(("pruning blocks", "perplexity")) for line in done.stderr.split("\r")
                   if line.strip()), done.stderr


def test_prune_calibrates_from_a_jsonl_field(tiny_model_dir, tmp_path, capsys):
    import json

    from spap.cli import main

    docs = (tiny_model_dir / "calib.txt").read_text().split("\n\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    argv = ["prune", str(tiny_model_dir / "model"), "--calib", str(tmp_path / "docs.jsonl"), "--n", "4", "--seqlen", "32"]
    with pytest.raises(SystemExit) as e:  # the default field, "text", is missing: refused before loading
        main([*argv, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--calib" in err and 'no "text" string' in err and "'body'" in err
    main([*argv, "--calib-field", "body", "--out", str(tmp_path / "b"), "--method", "magnitude"])
    report = json.loads((tmp_path / "b" / "spap_report.json").read_text())
    assert report["settings"]["calib_tokens"] == 4 * 32


def test_info_on_a_found_layout_and_refusal_before_loading(tmp_path, capsys, monkeypatch):
    """A family without an adapter: ``info`` describes the found layout; a layout spap cannot find (a
    mixture of experts) is refused from config.json, before the weights are loaded."""
    import transformers

    from spap.cli import main

    from .test_pipeline import COMMON, _model

    _model("phi3").save_pretrained(tmp_path / "phi3")
    main(["info", str(tmp_path / "phi3")])
    assert "model_type='phi3', adapter Discovered" in capsys.readouterr().out
    config = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, **COMMON)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "moe")])
    assert e.value.code == 2 and not loads
    assert "'qwen3_moe' model, which spap cannot prune (found a mixture-of-experts MLP" in capsys.readouterr().err
