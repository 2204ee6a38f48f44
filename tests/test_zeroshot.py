"""Zero-shot scoring (spap.zeroshot): every score against a brute-force forward pass per request.

Synthetic task files in the shared layout are written to ``tmp_path`` in the tiny model's vocabulary
(words ``w0``..``w119``); one test reads the real files (first 2 items).
"""

from __future__ import annotations

import bz2
import json
import math

import pytest
import torch
import transformers

import spap
from spap import zeroshot as zs
from spap.checks import InvalidArgumentError

WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir / "model")
    return model, tokenizer


def _words(gen: torch.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen))


def _write_tasks(root, items: int = 5, seed: int = 0) -> None:
    """Every task's files under ``root/zeroshot`` in the layout of the shared data README."""
    gen = torch.Generator().manual_seed(seed)
    z = root / "zeroshot"
    for folder in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada_openai"):
        (z / folder).mkdir(parents=True)

    def lines(rows):
        return "".join(json.dumps(r) + "\n" for r in rows)

    (z / "piqa/valid.jsonl").write_text(lines(
        {"goal": _words(gen, 4), "sol1": _words(gen, 1 + i % 3), "sol2": _words(gen, 3)} for i in range(items)))
    (z / "piqa/valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(items)))
    for name, file in (("arc_easy", "ARC-Easy-Test.jsonl"), ("arc_challenge", "ARC-Challenge-Test.jsonl")):
        rows = []
        for i in range(items):
            labels = ["A", "B", "C", "D", "E"][: 3 + i % 3] if i % 4 else ["1", "2", "3", "4"]
            rows.append({"id": f"q{i}", "question": {"stem": _words(gen, 5), "choices": [
                {"text": _words(gen, 1 + j % 2), "label": label} for j, label in enumerate(labels)]},
                "answerKey": labels[i % len(labels)]})
        (z / name / file).write_text(lines(rows))
    hella = []
    for i in range(items):
        hella += [f"{_words(gen, 1)}: {_words(gen, 6)} [header] {_words(gen, 1)}", str(i % 4)]
        hella += [_words(gen, 2 + j) for j in range(4)]
    (z / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(("\n".join(hella) + "\n").encode()))
    rows = []
    for i in range(items):
        prefix, options = _words(gen, 5), (_words(gen, 1), _words(gen, 1))
        rows.append({"context_options": [f"{prefix} {o}" for o in options], "continuation": _words(gen, 3),
                     "gold": i % 2})
    (z / "winogrande/winogrande_dev.jsonl").write_text(lines(rows))
    (z / "boolq/val.jsonl").write_text(lines({"question": _words(gen, 4), "passage": _words(gen, 12),
                                              "label": ["false", "true"][i % 2]} for i in range(items)))
    (z / "lambada_openai/lambada_test.jsonl").write_text(lines({"text": _words(gen, 8)} for _ in range(items)))


def _brute_force(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One unbatched forward pass of context + continuation; the continuation's summed log-probability
    and whether each of its tokens is the argmax."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
    ids = torch.tensor([ctx + cont])[:, -(model.config.max_position_embeddings + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), dim=-1)
    logp = logp[-len(cont):]
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def _expected(task, items, scores) -> tuple[float, float | None]:
    """acc and acc_norm recomputed from brute-force scores (the first of equal maxima wins)."""
    acc = norm = 0
    at = 0
    for item in items:
        lls = [s[0] for s in scores[at : at + len(item.requests)]]
        at += len(item.requests)
        acc += lls.index(max(lls)) == item.gold
        if item.lengths:
            normed = [ll / n for ll, n in zip(lls, item.lengths)]
            norm += normed.index(max(normed)) == item.gold
    return acc / len(items), norm / len(items) if task in ("piqa", "arc_easy", "arc_challenge", "hellaswag") else None


def test_every_task_matches_a_brute_force_forward_per_request(tiny, tmp_path):
    model, tokenizer = tiny
    _write_tasks(tmp_path, items=3)
    results = zs.zeroshot(model, tokenizer, "all", batch_size=3, data_dir=tmp_path)
    assert list(results) == list(zs.TASKS)
    for task in zs.TASKS:
        items = zs.load_task(task, tmp_path)
        requests = [r for item in items for r in item.requests]
        expected = [_brute_force(model, tokenizer, *r) for r in requests]
        got = zs.loglikelihoods(model, tokenizer, requests, batch_size=3)
        for (ll, greedy), (ref, ref_greedy) in zip(got, expected):
            assert ll == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy, task
        r = results[task]
        assert r.task == task and r.n == 3
        if task == "lambada_openai":
            assert r.acc == sum(g for _, g in expected) / 3
            assert r.perplexity == pytest.approx(math.exp(-sum(ll for ll, _ in expected) / 3), rel=1e-5)
            assert r.acc_norm is None
        else:
            acc, norm = _expected(task, items, expected)
            assert (r.acc, r.acc_norm, r.perplexity) == (acc, norm, None), task


def test_batching_and_padding_do_not_change_scores(tiny, tmp_path):
    model, tokenizer = tiny
    _write_tasks(tmp_path, items=4, seed=1)
    requests = [r for task in ("hellaswag", "piqa", "boolq") for item in zs.load_task(task, tmp_path)
                for r in item.requests]
    one = zs.loglikelihoods(model, tokenizer, requests, batch_size=1)
    for batch_size in (4, 64):
        other = zs.loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
        assert [g for _, g in other] == [g for _, g in one]
        assert [ll for ll, _ in other] == pytest.approx([ll for ll, _ in one], abs=1e-4)


def test_prompts_follow_the_harness(tmp_path):
    _write_tasks(tmp_path, items=2)
    rows = [json.loads(line) for line in (tmp_path / "zeroshot/piqa/valid.jsonl").read_text().splitlines()]
    piqa = zs.load_task("piqa", tmp_path)[0]
    assert piqa.requests == ((f"Question: {rows[0]['goal']}\nAnswer:", " " + rows[0]["sol1"]),
                             (f"Question: {rows[0]['goal']}\nAnswer:", " " + rows[0]["sol2"]))
    assert piqa.gold == 0 and piqa.lengths == (len(rows[0]["sol1"]), len(rows[0]["sol2"]))
    boolq = zs.load_task("boolq", tmp_path)[1]
    assert boolq.requests[0][0].endswith("?\nAnswer:") and [c for _, c in boolq.requests] == [" no", " yes"]
    assert boolq.gold == 1 and boolq.lengths is None
    hella = zs.load_task("hellaswag", tmp_path)[0]
    assert "[header]" not in hella.requests[0][0] and "  " not in hella.requests[0][0]
    arc = zs.load_task("arc_easy", tmp_path)
    assert arc[0].gold == 0 and len(arc[1].requests) == 4 and arc[1].gold == 1  # numeric, then letter keys
    lam = zs.load_task("lambada_openai", tmp_path)[0]
    text = json.loads((tmp_path / "zeroshot/lambada_openai/lambada_test.jsonl").read_text().splitlines()[0])["text"]
    assert lam.requests == ((text.rsplit(" ", 1)[0], " " + text.rsplit(" ", 1)[1]),)


def test_acc_norm_divides_by_the_choice_length():
    # Choice 0 has the larger log-likelihood; per character of the choice (no delimiter), choice 1 wins.
    item = zs.Item(((("q", " a"), ("q", " bbbbbbbbbb"))), gold=1, lengths=(1, 10))
    r = zs.score_task("piqa", [item], [(-2.0, False), (-5.0, False)])
    assert (r.acc, r.acc_norm) == (0.0, 1.0)
    # The lengths come from the choices as written, in characters (bytes for ASCII).
    assert zs._choices_item("q", ["ab", "c d e"], 0, True).lengths == (2, 5)


def test_winogrande_scores_only_the_shared_continuation(tiny, tmp_path):
    model, tokenizer = tiny
    _write_tasks(tmp_path, items=3, seed=2)
    items = zs.load_task("winogrande", tmp_path)
    for item in items:
        (c0, k0), (c1, k1) = item.requests
        assert k0 == k1 and c0 != c1  # partial scoring: one continuation under two contexts
    got = zs.loglikelihoods(model, tokenizer, [r for item in items for r in item.requests])
    for request, (ll, _) in zip([r for item in items for r in item.requests], got):
        assert ll == pytest.approx(_brute_force(model, tokenizer, *request)[0], abs=1e-4)
    # Only the 3 words after the blank are scored: the options' own tokens are context, not continuation.
    assert len(tokenizer(items[0].requests[0][1], add_special_tokens=False)["input_ids"]) == 3
    assert got[0][0] != got[1][0]


def test_lambada_is_right_only_when_every_token_is_the_greedy_one(tiny, tmp_path):
    model, tokenizer = tiny
    context = "w3 w17 w5 w88 w41"
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    greedy = []
    with torch.no_grad():
        for _ in range(2):
            logits = model(input_ids=torch.tensor([ids + greedy])).logits[0, -1, : len(WORDS) + 1]
            logits[0] = -math.inf  # a word of the vocabulary, not [UNK]
            greedy.append(int(logits.argmax()))
    words = [WORDS[i - 1] for i in greedy]
    requests = [(context, f" {words[0]} {words[1]}"), (context, f" {words[0]} {WORDS[greedy[1] % 100]}")]
    # The first word is the model's argmax over the tokenizer's words; a token outside them could be larger.
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids + greedy])).logits[0]
    truly_greedy = all(int(full[len(ids) - 1 + i].argmax()) == greedy[i] for i in range(2))
    (ll, g), (ll2, g2) = zs.loglikelihoods(model, tokenizer, requests)
    assert g == truly_greedy and not g2 and ll > ll2
    (tmp_path / "zeroshot/lambada_openai").mkdir(parents=True)
    (tmp_path / "zeroshot/lambada_openai/lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": c + k}) + "\n" for c, k in requests))
    r = zs.zeroshot(model, tokenizer, ["lambada_openai"], data_dir=tmp_path)["lambada_openai"]
    # LAMBADA's continuation is the last word only.
    last = zs.loglikelihoods(model, tokenizer, [(context + f" {words[0]}", f" {words[1]}"),
                                                (context + f" {words[0]}", f" {WORDS[greedy[1] % 100]}")])
    assert r.acc == sum(g for _, g in last) / 2 >= 0.5
    assert r.perplexity == pytest.approx(math.exp(-(last[0][0] + last[1][0]) / 2), rel=1e-5)


def test_limit_takes_the_first_items_and_the_table_lists_every_task(tiny, tmp_path):
    model, tokenizer = tiny
    _write_tasks(tmp_path, items=4)
    assert zs.load_task("piqa", tmp_path, limit=2) == zs.load_task("piqa", tmp_path)[:2]
    results = spap.eval.zeroshot(model, tokenizer, "piqa,lambada_openai", limit=2, data_dir=tmp_path)
    assert [r.n for r in results.values()] == [2, 2]
    text = spap.eval.zeroshot_table(results)
    lines = text.splitlines()
    assert lines[0].split() == ["task", "n", "acc", "acc_norm", "ppl"]
    assert lines[1].split()[:2] == ["piqa", "2"] and lines[2].split()[0] == "lambada_openai"
    mean = 100 * (results["piqa"].acc + results["lambada_openai"].acc) / 2
    assert lines[-1].split() == ["mean", "acc", f"{mean:.2f}"]


@pytest.mark.parametrize("kwargs, fragments", [
    ({"tasks": ["piqa", "mmlu"]}, ["'tasks'", "piqa, arc_easy", "lambada_openai", "mmlu"]),
    ({"tasks": "piqa,piqa"}, ["'tasks'", "distinct"]),
    ({"tasks": []}, ["'tasks'"]),
    ({"limit": 0}, ["'limit'", "[1, inf)"]),
    ({"batch_size": 0}, ["'batch_size'"]),
])
def test_bad_arguments_are_named_before_any_work(tiny, tmp_path, monkeypatch, kwargs, fragments):
    model, tokenizer = tiny
    _write_tasks(tmp_path, items=2)
    monkeypatch.setattr(zs, "loglikelihoods", lambda *a, **k: pytest.fail("scored before the check"))
    with pytest.raises(InvalidArgumentError) as e:
        zs.zeroshot(model, tokenizer, **{"tasks": "all", **kwargs}, data_dir=tmp_path)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_a_missing_file_is_named_with_spap_data_dir(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    _write_tasks(tmp_path, items=2)
    (tmp_path / "zeroshot/winogrande/winogrande_dev.jsonl").unlink()
    monkeypatch.setattr(zs, "loglikelihoods", lambda *a, **k: pytest.fail("scored before the check"))
    with pytest.raises(FileNotFoundError, match=r"winogrande_dev\.jsonl.*SPAP_DATA_DIR"):
        zs.zeroshot(model, tokenizer, ["piqa", "winogrande"], data_dir=tmp_path)
    monkeypatch.delenv("SPAP_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="SPAP_DATA_DIR"):
        zs.zeroshot(model, tokenizer, ["piqa"])


def test_the_real_files_read_and_score(tiny):
    try:
        spap.data.data_dir()
        for task in zs.TASKS:
            zs.task_paths(task)
    except FileNotFoundError:
        pytest.skip("shared zero-shot data not present")
    model, tokenizer = tiny
    choices = {"piqa": 2, "arc_easy": 4, "arc_challenge": 4, "hellaswag": 4, "winogrande": 2, "boolq": 2,
               "lambada_openai": 1}
    for task in zs.TASKS:
        items = zs.load_task(task, limit=2)
        assert len(items) == 2 and all(len(i.requests) == choices[task] for i in items), task
        assert all(0 <= i.gold < len(i.requests) for i in items)
    assert zs.load_task("piqa", limit=1)[0].gold == 0 and zs.load_task("boolq", limit=1)[0].gold == 0
    assert zs.load_task("winogrande", limit=1)[0].gold == 1 and zs.load_task("hellaswag", limit=1)[0].gold == 3
    results = zs.zeroshot(model, tokenizer, "all", limit=2)  # boolq's passages exceed the 128 positions
    assert all(r.n == 2 and 0 <= r.acc <= 1 for r in results.values())


def test_the_command_line_prints_the_table(tiny_model_dir, tmp_path, capsys):
    from spap.cli import main

    _write_tasks(tmp_path, items=3)
    main(["eval", str(tiny_model_dir / "model"), "--tasks", "piqa,boolq", "--limit", "2", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "task" and [line.split()[0] for line in out[1:3]] == ["piqa", "boolq"]
    assert out[1].split()[1] == "2" and out[-1].startswith("mean acc")


@pytest.mark.parametrize("argv, fragment", [
    (["--tasks", "piqa,nope"], "--tasks must be 'all' or a comma list"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be >= 1"),
    (["--limit", "3"], "--limit counts zero-shot items; it needs --tasks"),
    (["--tasks", "winogrande"], "winogrande_dev.jsonl"),
])
def test_the_command_line_refuses_bad_tasks(tiny_model_dir, tmp_path, capsys, argv, fragment):
    from spap.cli import main

    _write_tasks(tmp_path, items=2)
    (tmp_path / "zeroshot/winogrande/winogrande_dev.jsonl").unlink()
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw/test.rows.json").write_text("[]")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tiny_model_dir / "model"), "--data-dir", str(tmp_path), *argv])
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.slow
def test_lm_evaluation_harness_agrees_on_the_same_items():
    from spap import lmeval

    if not lmeval.lmeval_available():
        pytest.skip("lm-eval is not importable: pip install 'spap[lmeval]'")
    try:
        for task in zs.TASKS:
            zs.task_paths(task)
    except FileNotFoundError:
        pytest.skip("shared zero-shot data not present")
    model, tokenizer = spap.load_model("smollm2")
    ours = zs.zeroshot(model, tokenizer, "all", limit=20)
    theirs = lmeval.lmeval_zeroshot(model, tokenizer, "all", limit=20)
    for task in zs.TASKS:
        a, b = ours[task], theirs[task]
        assert a.n == b.n == 20
        assert abs(a.acc - b.acc) <= 0.005, (task, a, b)
        if a.acc_norm is not None:
            assert abs(a.acc_norm - b.acc_norm) <= 0.005, (task, a, b)
        if a.perplexity is not None:
            assert a.perplexity == pytest.approx(b.perplexity, rel=1e-3)
