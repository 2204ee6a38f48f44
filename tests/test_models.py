"""Adapters (chosen by config.model_type), LinearView, calibration batches and calibration sets."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import spap
from spap.adapters import ADAPTERS, LinearView, get_adapter
from spap.capture import calibration_batches
from spap.data import calibration_set, random_windows, text_file

from .test_eval import CharTokenizer


def _tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=128)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def test_adapter_comes_from_model_type_not_from_a_name():
    model = _tiny_llama()
    model.config.name_or_path = "someone/renamed-finetune"
    assert type(get_adapter(model)).__name__ == "LlamaFamily"
    model.config.model_type = "mamba"  # a family without an adapter: its layout is found by structure
    assert type(get_adapter(model)).__name__ == "Discovered"
    with pytest.raises(ValueError, match=r"found no decoder block list.*Supported model types \(with their own "
                                         r"adapters\): " + ", ".join(sorted(ADAPTERS))):
        get_adapter(torch.nn.Linear(2, 2))


def test_every_adapter_names_its_modules_on_a_real_block():
    model = _tiny_llama()
    adapter = get_adapter(model)
    block = adapter.blocks()[0]
    groups = adapter.linear_groups(block)
    assert [list(g) for g in groups] == [["q", "k", "v"], ["o"], ["mlp_in0", "mlp_in1"], ["mlp_out"]]
    assert LinearView(adapter.mlp_out(block)).d_in == adapter.intermediate_size == 64
    assert (adapter.n_heads, adapter.n_kv_heads, adapter.head_dim) == (2, 1, 16)


def test_linear_view_hides_conv1d_transpose():
    conv = transformers.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs; weight stored (4, 6)
    x = torch.randn(3, 4)
    view = LinearView(conv)
    assert view.weight.shape == (6, 4)
    torch.testing.assert_close(conv(x), x @ view.weight.T + view.bias)
    keep = torch.tensor([0, 2, 5])
    expected = conv(x)[:, keep]
    view.keep_outputs(keep)
    torch.testing.assert_close(conv(x), expected)
    assert view.weight.shape == (3, 4) and conv.nf == 3


def test_calibration_batches_accepts_the_documented_forms():
    ids = torch.randint(0, 128, (10, 7))
    assert [b.shape for b in calibration_batches(ids, batch_size=4)] == [(4, 7), (4, 7), (2, 7)]
    assert len(calibration_batches([ids[:3], {"input_ids": ids[3:]}])) == 2
    tok = CharTokenizer()
    assert [b.shape for b in calibration_batches(["abcd", "efgh", "ijkl"], tok, batch_size=2)] == [(2, 4), (1, 4)]
    assert [b.shape for b in calibration_batches(["ab", "cde"], tok)] == [(1, 2), (1, 3)]  # unequal: one per batch
    for bad in (torch.zeros(3, 4), torch.zeros(0, 4, dtype=torch.long), [], [1, 2], "text"):
        with pytest.raises(ValueError, match="'calib'"):
            calibration_batches(bad, tok)


def test_calibration_set_sources_are_seeded(tmp_path):
    tok = CharTokenizer()
    docs = [f"document number {i} " * (5 + i) for i in range(20)]
    a = calibration_set(docs, tok, n=6, seqlen=32, seed=3)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, calibration_set(docs, tok, n=6, seqlen=32, seed=3))
    assert not torch.equal(a, calibration_set(docs, tok, n=6, seqlen=32, seed=4))

    (tmp_path / "c4.jsonl").write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs))
    assert torch.equal(calibration_set(str(tmp_path / "c4.jsonl"), tok, n=6, seqlen=32, seed=3), a)
    (tmp_path / "plain.txt").write_text("\n\n".join(docs))
    assert text_file(tmp_path / "plain.txt") == docs
    (tmp_path / "rows.json").write_text(json.dumps(["row one", "", "row two"]))
    assert text_file(tmp_path / "rows.json") == ["row one\n\n\n\nrow two"]

    class LooksLikeADataset:  # duck typing is not enough: a real datasets.Dataset is (tests/test_data.py)
        column_names = ["text"]

        def __getitem__(self, key):
            return docs

    with pytest.raises(ValueError, match="'source'"):
        calibration_set(LooksLikeADataset(), tok, n=6, seqlen=32, seed=3)
    with pytest.raises(ValueError, match="'source'"):
        calibration_set(str(tmp_path / "missing.txt"), tok, n=2, seqlen=8)
    with pytest.raises(ValueError, match="Too few documents"):
        random_windows(["short"], tok, n=2, seqlen=64)


def test_shared_data_sets_are_found():
    try:
        spap.data.data_dir()
    except FileNotFoundError:
        pytest.skip("shared data folder not present")
    assert len(spap.data.c4_documents(0, 500)) == 500
    assert len(spap.data.wikitext_rows()) == 4358


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3_text", "opt", "gpt2", "phi3", "gpt_neox", "falcon", "starcoder2"])
def test_captured_block_arguments_replay_the_models_own_forward(name):
    """Running the blocks one by one on the captured inputs gives the model's own last-block output, also
    when layers differ in their arguments (Gemma 3: a sliding window shorter than the sequence, and other
    rotary tables in local and global layers)."""
    from spap.capture import capture_block_inputs, run_block

    from .test_pipeline import CONFIGS

    fields = CONFIGS[name].to_dict()
    if name in ("gemma2", "gemma3_text"):
        fields.update(sliding_window=8, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    cfg = CONFIGS[name].__class__(**fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    blocks = get_adapter(model).blocks()
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    batches = list(ids.split(2))
    hidden, kwargs = capture_block_inputs(model, blocks, batches, torch.device("cpu"), torch.device("cpu"))
    assert len(kwargs) == len(blocks) and all(len(k) == len(batches) for k in kwargs)
    assert all("forward" not in vars(b) for b in blocks)  # the recorders are gone
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden = [run_block(block, h, kwargs[i][b], torch.device("cpu")) for b, h in enumerate(hidden)]
    torch.testing.assert_close(torch.cat(hidden), seen[0], rtol=1e-5, atol=1e-5)


def test_gguf_quantizer_state_is_dropped_and_others_are_kept():
    """A GGUF-loaded model holds float weights but a quantizer that makes save_pretrained refuse."""
    from types import SimpleNamespace

    from spap.models import drop_gguf_quantizer

    class FakeQuantizer:
        def __init__(self, method):
            self.quantization_config = SimpleNamespace(quant_method=SimpleNamespace(value=method))
            self.removed = False

        def remove_quantization_config(self, model):
            self.removed = True
            del model.hf_quantizer

    gguf, other = SimpleNamespace(hf_quantizer=FakeQuantizer("gguf")), SimpleNamespace(hf_quantizer=FakeQuantizer("bnb"))
    quantizer = gguf.hf_quantizer
    drop_gguf_quantizer(gguf)
    drop_gguf_quantizer(other)
    drop_gguf_quantizer(SimpleNamespace())  # no quantizer: nothing to do
    assert quantizer.removed and not hasattr(gguf, "hf_quantizer")
    assert not other.hf_quantizer.removed
