"""spap.eval: the perplexity protocol and the throughput measurement, on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from spap.eval import perplexity, throughput, tokens_per_second


class CharTokenizer:
    """One token per character (ids modulo the vocabulary): enough to test the windowing."""

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab
        self.calls = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        self.calls += 1
        ids = [ord(c) % self.vocab for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


@pytest.fixture(scope="module")
def model():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _reference(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    nll = []
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * seqlen : (w + 1) * seqlen][None]
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            nll.append(-logp.gather(1, x[0, 1:, None]).squeeze(1))
    return math.exp(float(torch.cat(nll).mean()))


def test_rows_are_joined_windows_do_not_overlap_and_the_remainder_is_dropped(model):
    rows = ["alpha beta", "", "gamma delta epsilon", "zeta"] * 5
    text = "\n\n".join(rows)
    tok = CharTokenizer()
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    seqlen = 16
    n = ids.numel() // seqlen
    assert ids.numel() % seqlen != 0  # there is a remainder to drop
    tok.calls = 0
    ppl = perplexity(model, tok, rows, seqlen=seqlen)
    assert tok.calls == 1  # tokenized once
    assert math.isclose(ppl, _reference(model, ids, seqlen, n), rel_tol=1e-5)
    assert math.isclose(perplexity(model, tok, text, seqlen=seqlen), ppl, rel_tol=1e-12)
    assert math.isclose(perplexity(model, tok, rows, seqlen=seqlen, max_windows=2), _reference(model, ids, seqlen, 2),
                        rel_tol=1e-5)


def test_perplexity_rejects_bad_arguments(model):
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="'seqlen'"):
        perplexity(model, tok, "abc", seqlen=1)
    with pytest.raises(ValueError, match="'max_windows'"):
        perplexity(model, tok, "abc" * 20, seqlen=8, max_windows=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "abc", seqlen=8)


def test_tokens_per_second_reports_prefill_and_decode(model):
    speed = tokens_per_second(model, prompt_len=8, new_tokens=4)
    assert set(speed) == {"prefill", "decode"}
    assert speed["prefill"] > 0 and speed["decode"] > 0


def test_throughput_times_every_repeat_and_checks_its_arguments(model):
    runs = throughput(model, prompt_len=8, new_tokens=3, batch=2, repeats=3, warmup=1)
    assert set(runs) == {"prefill", "decode"}
    assert len(runs["prefill"]) == len(runs["decode"]) == 3
    assert all(v > 0 for v in runs["prefill"] + runs["decode"])
    for bad in ({"batch": 0}, {"repeats": 0}, {"warmup": -1}, {"prompt_len": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            throughput(model, **bad)
