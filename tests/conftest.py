"""Fixtures shared by the command-line tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved like a Hugging Face checkpoint (offline):
    ``model/`` (hidden 64, MLP 128, 3 blocks, 4 heads in 2 KV groups, 128 positions) and ``calib.txt``
    (12 documents of 80 words)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(120)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(words[int(j)] for j in torch.randint(0, 120, (80,), generator=gen)) for _ in range(12)]
    (root / "calib.txt").write_text("\n\n".join(docs))
    return root
