"""Zero-shot accuracy on seven tasks read from local files, scored as lm-evaluation-harness scores them.

Every task is a list of :class:`Item`: one or more ``(context, continuation)`` requests whose
log-likelihoods decide it.  The prompts and preprocessing are those of lm-evaluation-harness's task
definitions (v0.4):

- ``piqa``: ``"Question: {goal}\\nAnswer:"``, choices ``sol1``, ``sol2``;
- ``arc_easy``, ``arc_challenge``: ``"Question: {stem}\\nAnswer:"``, the choices' texts;
- ``hellaswag``: ``"{activity_label}: {ctx}"`` and the endings, cleaned of ``[...]`` tags (the local file
  stores ``ctx`` joined, so ``ctx_b`` is not capitalised as the harness does);
- ``winogrande``: partial scoring: the shared continuation after the blank, under the sentence up to the
  blank filled in with each option;
- ``boolq``: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``no``, ``yes``;
- ``lambada_openai``: the text without its last word; the continuation is the last word.

A choice's continuation is ``" " + choice``.  ``acc`` takes the choice of largest log-likelihood,
``acc_norm`` the largest log-likelihood per character of the choice (the harness's ``acc_norm``:
``len(choice)``, which is its byte length for ASCII text); LAMBADA reports the share of items whose
every continuation token is the greedy prediction, and the perplexity ``exp(-mean log-likelihood)``.

Encoding follows the harness's ``HFLM``: trailing spaces of the context move to the continuation; the
context is encoded alone, the continuation's tokens are those of ``context + continuation`` after the
context's; no special tokens are added; the input is left-truncated to the model's positions.
"""

from __future__ import annotations

import bz2
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import Boolean, Interval, InvalidArgumentError, NoneOr, check_table, device as _device_arg
from .data import InvalidFileError, data_dir as _data_dir

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada_openai")

# The files each task reads, relative to the data directory (see ../shared/data/README.md).
TASK_FILES = {
    "piqa": ("zeroshot/piqa/valid.jsonl", "zeroshot/piqa/valid-labels.lst"),
    "arc_easy": ("zeroshot/arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("zeroshot/arc_challenge/ARC-Challenge-Test.jsonl",),
    "hellaswag": ("zeroshot/hellaswag/hellaswag_val_full.txt.bz2",),
    "winogrande": ("zeroshot/winogrande/winogrande_dev.jsonl",),
    "boolq": ("zeroshot/boolq/val.jsonl",),
    "lambada_openai": ("zeroshot/lambada_openai/lambada_test.jsonl",),
}

# Tasks whose acc_norm the harness reports (the others: winogrande's continuations are equal, boolq's
# and lambada's task definitions ask only for acc).
_ACC_NORM = ("piqa", "arc_easy", "arc_challenge", "hellaswag")


@dataclass(frozen=True)
class Item:
    """One question: ``requests[i] = (context, continuation)`` scores choice ``i``; ``gold`` indexes the
    right one (0 for LAMBADA, which has one request); ``lengths[i]`` is the divisor of ``acc_norm``
    (``len(choice)`` in characters), ``None`` where the task reports no ``acc_norm``."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    lengths: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TaskResult:
    """The scores of one task on its first ``n`` items: accuracies as fractions in [0, 1]; ``acc_norm``
    is ``None`` where the task reports none; ``perplexity`` (of the last word) only for LAMBADA."""

    task: str
    n: int
    acc: float
    acc_norm: float | None = None
    perplexity: float | None = None


@dataclass(frozen=True)
class _TaskNames:
    """A non-empty list or tuple of distinct names from ``TASKS``, or the string ``"all"``."""

    def accepts(self, value: Any) -> bool:
        if value == "all":
            return True
        return (isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) and v in TASKS for v in value)
                and len(set(value)) == len(value))

    def __str__(self) -> str:
        return f"'all' or a non-empty list of distinct names from {', '.join(TASKS)}"


_CONSTRAINTS = {
    "tasks": _TaskNames(),
    "limit": NoneOr(Interval(int, 1, None)),
    "batch_size": Interval(int, 1, None),
    "progress": Boolean(),
}


def task_names(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"`` or a comma-separated string or a sequence of names -> the tuple of task names, checked."""
    if isinstance(tasks, str) and tasks != "all":
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    check_table("zeroshot", {"tasks": _CONSTRAINTS["tasks"]}, {"tasks": tasks})
    return TASKS if tasks == "all" else tuple(tasks)


def task_paths(task: str, data_dir: str | Path | None = None) -> tuple[Path, ...]:
    """The files of ``task``; ``FileNotFoundError`` naming the missing file and ``SPAP_DATA_DIR``."""
    try:
        directory = _data_dir(data_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"No data directory for the zero-shot task {task!r}: pass data_dir=... or set "
                                "SPAP_DATA_DIR to the shared data folder.") from None
    paths = tuple(directory / name for name in TASK_FILES[task])
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"The zero-shot task {task!r} reads {path}, which does not exist; pass data_dir=... "
                                    "or set SPAP_DATA_DIR to a folder holding zeroshot/ (see the shared data README).")
    return paths


def load_task(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items (all when ``None``) of ``task``, in file order, as :class:`Item`."""
    task_names([task])
    check_table("load_task", {"limit": _CONSTRAINTS["limit"]}, {"limit": limit})
    paths = task_paths(task, data_dir)
    try:
        items = _READERS[task](*paths)
    except (KeyError, IndexError, ValueError, TypeError) as e:
        if isinstance(e, InvalidFileError):
            raise
        raise InvalidFileError(f"{paths[0]} is not in the format of the zero-shot task {task!r} ({type(e).__name__}: "
                               f"{e}); see the shared data README.") from None
    return items[:limit]


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InvalidFileError(f"{path}, line {number}: not JSON ({e.msg}).") from None
    return rows


def _choices_item(context: str, choices: Sequence[str], gold: int, norm: bool) -> Item:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside the {len(choices)} choices")
    # An empty choice would divide by zero (the harness gets -inf or NaN there); it counts as one character.
    return Item(tuple((context, " " + c) for c in choices), gold,
                tuple(max(len(c), 1) for c in choices) if norm else None)


def _piqa(questions: Path, labels: Path) -> list[Item]:
    rows = _jsonl(questions)
    golds = [int(x) for x in labels.read_text().split()]
    if len(golds) != len(rows):
        raise InvalidFileError(f"{labels} holds {len(golds)} labels for the {len(rows)} questions of {questions}.")
    return [_choices_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], g, True)
            for r, g in zip(rows, golds)]


def _arc(path: Path) -> list[Item]:
    items = []
    for r in _jsonl(path):
        choices = r["question"]["choices"]
        labels = [c["label"] for c in choices]
        items.append(_choices_item(f"Question: {r['question']['stem']}\nAnswer:", [c["text"] for c in choices],
                                   labels.index(r["answerKey"]), True))
    return items


def _hellaswag_clean(text: str) -> str:
    """The harness's ``preprocess``: WikiHow's ``[title]`` becomes a full stop, other ``[...]`` tags go."""
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(path: Path) -> list[Item]:
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise InvalidFileError(f"{path} holds {len(lines)} lines, not a multiple of 6 (context, gold, 4 endings).")
    return [_choices_item(_hellaswag_clean(lines[i]), [_hellaswag_clean(e) for e in lines[i + 2 : i + 6]],
                          int(lines[i + 1]), True) for i in range(0, len(lines), 6)]


def _winogrande(path: Path) -> list[Item]:
    items = []
    for r in _jsonl(path):
        gold = int(r["gold"])
        if not 0 <= gold < len(r["context_options"]):
            raise ValueError(f"gold index {gold} outside the options")
        items.append(Item(tuple((c, " " + r["continuation"]) for c in r["context_options"]), gold))
    return items


def _boolq(path: Path) -> list[Item]:
    labels = {"false": 0, "true": 1, False: 0, True: 1}
    return [_choices_item(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], labels[r["label"]],
                          False) for r in _jsonl(path)]


def _lambada(path: Path) -> list[Item]:
    items = []
    for r in _jsonl(path):
        words = r["text"].split(" ")
        items.append(Item(((" ".join(words[:-1]), " " + words[-1]),), 0))
    return items


_READERS = {"piqa": _piqa, "arc_easy": _arc, "arc_challenge": _arc, "hellaswag": _hellaswag,
            "winogrande": _winogrande, "boolq": _boolq, "lambada_openai": _lambada}


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as the harness encodes a pair (no special tokens; an empty
    context becomes the BOS token, else EOS)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids):]


def _max_length(model: nn.Module) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return 2048


def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                   device: str | torch.device | None = None, progress: bool = False,
                   desc: str = "log-likelihoods") -> list[tuple[float, bool]]:
    """``(log-likelihood, greedy)`` of each ``(context, continuation)``: the summed natural-log
    probability of the continuation's tokens given the context, and whether every one of them is the
    model's argmax.

    Requests whose model input is the same (a context shared by one-token choices) share one row; rows
    are sorted by length, longest first, and cut into batches of ``batch_size``, padded on the right
    (no attention mask is needed: causal attention never reads a later pad, so the padding changes no
    score).  Only the continuations' positions go through the output head.
    """
    check_table("loglikelihoods", {"batch_size": _CONSTRAINTS["batch_size"], "progress": _CONSTRAINTS["progress"]},
                {"batch_size": batch_size, "progress": progress})
    device = _device_arg("device", device, "loglikelihoods") if device is not None else next(model.parameters()).device
    limit = _max_length(model)
    rows: dict[tuple[int, ...], int] = {}  # model input -> row number
    needs = []  # per request: (row, continuation ids)
    for context, continuation in requests:
        context_ids, continuation_ids = encode_request(tokenizer, context, continuation)
        if not continuation_ids:
            raise InvalidArgumentError(f"The continuation {continuation!r} encodes to no tokens after {context!r}.")
        if len(continuation_ids) > limit:
            raise InvalidArgumentError(f"The continuation {continuation!r} has {len(continuation_ids)} tokens, more "
                                       f"than the model's {limit} positions.")
        tokens = tuple((context_ids + continuation_ids)[-(limit + 1):][:-1])
        needs.append((rows.setdefault(tokens, len(rows)), continuation_ids))
    inputs = list(rows)
    readers: list[list[int]] = [[] for _ in inputs]  # per row: the requests read from it
    for request, (row, _) in enumerate(needs):
        readers[row].append(request)
    deepest = [max(len(needs[q][1]) for q in qs) for qs in readers]  # per row: final positions read
    order = sorted(range(len(inputs)), key=lambda r: (-len(inputs[r]), r))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    keep = "logits_to_keep" in _forward_arguments(model)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(needs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                lengths = [len(inputs[r]) for r in batch]
                x = torch.zeros(len(batch), max(lengths), dtype=torch.long)
                for i, r in enumerate(batch):
                    x[i, : lengths[i]] = torch.tensor(inputs[r])
                # The positions any row of the batch reads, as one range: the head runs on these only.
                start = min(n - deepest[r] for n, r in zip(lengths, batch))
                kwargs = {"logits_to_keep": torch.arange(start, max(lengths))} if keep else {}
                logits = model(input_ids=x.to(device), use_cache=False, **kwargs).logits
                offset = start if keep else 0
                for i, r in enumerate(batch):
                    end = lengths[i] - offset
                    logprobs = torch.log_softmax(logits[i, end - deepest[r] : end].float(), dim=-1).cpu()
                    for q in readers[r]:
                        target = torch.tensor(needs[q][1])
                        lp = logprobs[deepest[r] - len(target):]
                        out[q] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


def _forward_arguments(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def score_task(task: str, items: Sequence[Item], results: Sequence[tuple[float, bool]]) -> TaskResult:
    """The task's metrics from the ``(log-likelihood, greedy)`` of its items' requests, in order."""
    n = len(items)
    if task == "lambada_openai":
        lls = [r[0] for r in results]
        return TaskResult(task, n, sum(r[1] for r in results) / n, None, math.exp(-sum(lls) / n))
    correct = correct_norm = 0
    at = 0
    for item in items:
        lls = [r[0] for r in results[at : at + len(item.requests)]]
        at += len(item.requests)
        correct += _argmax(lls) == item.gold
        if item.lengths is not None:
            correct_norm += _argmax([ll / length for ll, length in zip(lls, item.lengths)]) == item.gold
    return TaskResult(task, n, correct / n, correct_norm / n if task in _ACC_NORM else None)


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's ``argmax`` rule, as the harness uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def zeroshot(model: nn.Module, tokenizer, tasks: str | Sequence[str] = "all", *, limit: int | None = None,
             batch_size: int = 8, device: str | torch.device | None = None, data_dir: str | Path | None = None,
             progress: bool = False) -> dict[str, TaskResult]:
    """Zero-shot scores of ``model`` on ``tasks`` (``"all"``, names from :data:`TASKS`, or a
    comma-separated string), each on its first ``limit`` items (all when ``None``).

    Reads the files under ``data_dir`` (default ``$SPAP_DATA_DIR``, else ``../shared/data``); every
    argument and every task's file is checked before any scoring.  The model stays where it is;
    ``device`` (default: the model's) receives the inputs.  Returns ``{task: TaskResult}`` in the order
    of ``tasks``.
    """
    names = task_names(tasks)
    check_table("zeroshot", {k: _CONSTRAINTS[k] for k in ("limit", "batch_size", "progress")},
                {"limit": limit, "batch_size": batch_size, "progress": progress})
    if device is not None:
        _device_arg("device", device, "zeroshot")
    for name in names:
        task_paths(name, data_dir)
    loaded = {name: load_task(name, data_dir, limit) for name in names}
    results = {}
    for name, items in loaded.items():
        requests = [request for item in items for request in item.requests]
        scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, device=device, progress=progress,
                                desc=f"zero-shot {name}")
        results[name] = score_task(name, items, scores)
    return results


def table(results: dict[str, TaskResult] | Sequence[TaskResult]) -> str:
    """A text table: task, n, acc and acc_norm in percent, LAMBADA's perplexity, and the mean of acc
    over the tasks (the figure pruning papers average)."""
    rows = list(results.values()) if isinstance(results, dict) else list(results)
    lines = [f"{'task':<16}{'n':>7}{'acc':>8}{'acc_norm':>10}{'ppl':>9}"]
    for r in rows:
        norm = f"{100 * r.acc_norm:.2f}" if r.acc_norm is not None else "-"
        ppl = f"{r.perplexity:.2f}" if r.perplexity is not None else "-"
        lines.append(f"{r.task:<16}{r.n:>7}{100 * r.acc:>8.2f}{norm:>10}{ppl:>9}")
    if rows:
        lines.append(f"{'mean acc':<16}{'':>7}{100 * sum(r.acc for r in rows) / len(rows):>8.2f}")
    return "\n".join(lines)
