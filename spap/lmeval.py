"""The local zero-shot files run through lm-evaluation-harness (``pip install spap[lmeval]``).

:func:`lmeval_zeroshot` is a cross-check of :func:`spap.zeroshot.zeroshot`: it converts the first
``limit`` items of each task to the layout of the Hugging Face dataset the harness's own task reads,
writes a task YAML that ``include``-s the harness's definition (its prompts, preprocessing and metrics)
with ``dataset_path: json`` pointing at the converted file, and evaluates the in-memory model through
the harness's ``HFLM`` wrapper.  Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checks import Interval, NoneOr, check_table
from .zeroshot import TaskResult, load_task, task_names, task_paths

# Where each task's definition lives inside the installed lm_eval package, and the split it evaluates.
_HARNESS_TASKS = {
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
}


def lmeval_available() -> bool:
    """Whether ``lm_eval`` can be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def harness_documents(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The first ``limit`` items of ``task`` in the layout of the Hugging Face dataset that the harness's
    task reads (``goal/sol1/sol2/label`` for PIQA, ``sentence/option1/option2/answer`` for WinoGrande...)."""
    paths = task_paths(task, data_dir)
    if task == "piqa":
        rows = [json.loads(line) for line in paths[0].read_text(encoding="utf-8").splitlines() if line.strip()]
        labels = paths[1].read_text().split()
        return [{**r, "label": int(g)} for r, g in zip(rows, labels)][:limit]
    if task in ("arc_easy", "arc_challenge"):
        rows = [json.loads(line) for line in paths[0].read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
        return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in rows]
    if task == "hellaswag":
        docs = []
        for item in load_task(task, data_dir, limit):
            # The file joins ctx_a and ctx_b; the harness's process_docs joins them again with a space
            # (stripped by its preprocess) and cleans the text, so ctx_b = "" gives the same query.
            label, _, ctx = item.requests[0][0].partition(": ")
            docs.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "label": str(item.gold),
                         "endings": [c[1:] for _, c in item.requests]})
        return docs
    if task == "winogrande":
        docs = []
        for item in load_task(task, data_dir, limit):
            (first, continuation), (second, _) = item.requests
            cut = len(_common_prefix(first, second))
            cut = first.rfind(" ", 0, cut) + 1  # the blank starts a word
            docs.append({"sentence": first[:cut] + "_" + continuation, "option1": first[cut:],
                         "option2": second[cut:], "answer": str(item.gold + 1)})
        return docs
    if task == "boolq":
        rows = [json.loads(line) for line in paths[0].read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
        return [{"passage": r["passage"], "question": r["question"],
                 "label": int(r["label"] in ("true", True))} for r in rows]
    rows = [json.loads(line) for line in paths[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"text": r["text"]} for r in rows][:limit]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def lmeval_zeroshot(model: nn.Module, tokenizer, tasks: str | Sequence[str] = "all", *, limit: int | None = None,
                    batch_size: int = 8, device: str | None = None,
                    data_dir: str | Path | None = None) -> dict[str, TaskResult]:
    """:func:`spap.zeroshot.zeroshot`'s scores computed by lm-evaluation-harness on the same items.

    Raises ``ImportError`` when ``lm_eval`` is not installed (``pip install spap[lmeval]``).
    """
    names = task_names(tasks)
    check_table("lmeval_zeroshot", {"limit": NoneOr(Interval(int, 1, None)), "batch_size": Interval(int, 1, None)},
                {"limit": limit, "batch_size": batch_size})
    for name in names:
        task_paths(name, data_dir)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lmeval_zeroshot needs lm-evaluation-harness: pip install 'spap[lmeval]'") from e
    harness_tasks = Path(lm_eval.__file__).parent / "tasks"
    device = device or str(next(model.parameters()).device)
    with tempfile.TemporaryDirectory(prefix="spap-lmeval-") as tmp:
        for name in names:
            definition, split = _HARNESS_TASKS[name]
            data = Path(tmp) / f"{name}.jsonl"
            data.write_text("".join(json.dumps(d) + "\n" for d in harness_documents(name, data_dir, limit)))
            # JSON is a subset of YAML: the task file is written with json.dumps, no YAML writer needed.
            splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
            splits[f"{split}_split"] = split
            config = {"include": str(harness_tasks / definition), "task": f"spap_{name}", "tag": [],
                      "dataset_path": "json", "dataset_name": None,
                      "dataset_kwargs": {"data_files": {split: str(data)}}, **splits}
            (Path(tmp) / f"spap_{name}.yaml").write_text(json.dumps(config, indent=1) + "\n")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        manager = TaskManager(include_path=tmp, include_defaults=True)
        with torch.no_grad():
            out = lm_eval.simple_evaluate(model=lm, tasks=[f"spap_{n}" for n in names], task_manager=manager,
                                          num_fewshot=0, limit=limit, log_samples=False, bootstrap_iters=0,
                                          verbosity="ERROR")
    results = {}
    for name in names:
        r = out["results"][f"spap_{name}"]
        results[name] = TaskResult(name, len(harness_documents(name, data_dir, limit)), r["acc,none"],
                                   r.get("acc_norm,none") if name in ("piqa", "arc_easy", "arc_challenge", "hellaswag")
                                   else None, r.get("perplexity,none"))
    return results
