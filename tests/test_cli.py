"""The command line: argument checks happen before any model is loaded."""

from __future__ import annotations

import pytest


def test_cli_rejects_bad_arguments_before_loading():
    from spap.cli import main

    for argv, message in [
        (["prune", "smollm2", "--out", "x", "--sparsity", "1.5"], "--sparsity"),
        (["prune", "smollm2", "--out", "x", "--structure", "rows"], "--structure"),
        (["demo", "--n", "0"], "--n"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert message in str(e.value)


def test_prune_refuses_an_existing_output(tmp_path):
    from spap.cli import main

    with pytest.raises(SystemExit, match="already exists"):
        main(["prune", "smollm2", "--out", str(tmp_path)])
