"""Real layer problems from SmolLM2-135M: Gram matrices of every linear's input, cached on disk.

One dense forward pass of the calibration windows through the whole model, with hooks that stream each
linear's input into a :class:`solvers.GramAccumulator` (inputs shared by several linears, q/k/v and
gate/up, are accumulated once).  This is the *dense-input* Gram of every layer: right for comparing
solvers on the same problems, while ``spap.prune_layerwise`` re-captures inputs block by block from the
pruned model.

The cache (float64, about 0.8 GB for 64×1024 tokens) goes to ``$SPAP_CACHE`` or ``~/.cache/spap``.

    python benchmarks/real_layers.py --n 64 --seqlen 1024      # build the cache once (~1 min)

``--split validation`` captures held-out Grams instead (``load(..., split="validation")``): the first ``n``
consecutive windows of the validation split (``spap.data.validation_documents`` of the 64-window calibration
draw; the text of ``val_ppl`` in ``benchmarks/end_to_end.py``), ``down_proj`` inputs only by default:

    python benchmarks/real_layers.py --split validation --n 32    # 6.5 min on one busy thread, 0.67 GB
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import solvers

# Linear whose input Gram is captured -> the linears sharing that input.
# Every linear of a block, in the model's order.
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

SHARED_INPUTS = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


# Validation Grams: the split is the documents of C4 [:500] that this calibration draw does not use.
VALIDATION_OF = 64  # windows of the calibration draw that defines the split (its seqlen and seed as given)
VALIDATION_LINEARS = ("mlp.down_proj",)


def cache_path(n: int, seqlen: int, seed: int, split: str = "calibration") -> Path:
    root = Path(os.environ.get("SPAP_CACHE", Path.home() / ".cache" / "spap"))
    if split == "validation":
        names = "-".join(s.split(".")[-1] for s in VALIDATION_LINEARS)
        return root / f"smollm2-grams-c4val{VALIDATION_OF}-n{n}-L{seqlen}-s{seed}-{names}.pt"
    return root / f"smollm2-grams-c4-n{n}-L{seqlen}-s{seed}.pt"


def validation_windows(tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """The first ``n`` consecutive windows of ``seqlen`` tokens of the validation split (joined with blank
    lines, as ``spap.eval.perplexity`` cuts it): LongTensor ``(n, seqlen)``."""
    from spap.data import validation_documents

    text = "\n\n".join(validation_documents(tokenizer, n=VALIDATION_OF, seqlen=seqlen, seed=seed))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < n * seqlen:
        raise ValueError(f"the validation split holds {ids.numel()} tokens, fewer than {n}x{seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def capture(n: int = 64, seqlen: int = 1024, seed: int = 0, batch: int = 4, split: str = "calibration") -> dict:
    """Run the calibration windows (or, with ``split="validation"``, the validation windows, capturing only
    ``VALIDATION_LINEARS``) through SmolLM2 and return ``{"grams": {...}, "weights": {...}}``."""
    from spap.data import c4_documents, random_windows
    from spap.models import load_model

    model, tokenizer = load_model("smollm2")
    if split == "validation":
        ids = validation_windows(tokenizer, n, seqlen, seed)
        suffixes = {k: v for k, v in SHARED_INPUTS.items() if any(lin in v for lin in VALIDATION_LINEARS)}
    else:
        ids = random_windows(c4_documents(0, 500), tokenizer, n=n, seqlen=seqlen, seed=seed)
        suffixes = SHARED_INPUTS
    accs: dict[str, solvers.GramAccumulator] = {}
    handles = []
    for name, module in model.named_modules():
        for suffix in suffixes:
            if name.endswith(suffix):
                acc = accs[name] = solvers.GramAccumulator(module.in_features)
                handles.append(module.register_forward_pre_hook(lambda mod, args, acc=acc: acc.add_batch(args[0])))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch):
            model(ids[i : i + batch])
    for h in handles:
        h.remove()
    weights = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "layers." in name
        and (split != "validation" or any(name.endswith(lin) for lin in VALIDATION_LINEARS))
    }
    grams = {name: (acc.H, acc.mean, acc.n_samples) for name, acc in accs.items()}
    return {"grams": grams, "weights": weights, "seconds": time.perf_counter() - start, "n": n, "seqlen": seqlen,
            "split": split}


def load(n: int = 64, seqlen: int = 1024, seed: int = 0, split: str = "calibration") -> dict:
    """The cached capture, building it on first use (``split="validation"``: held-out down_proj Grams)."""
    if split not in ("calibration", "validation"):
        raise ValueError(f"split must be 'calibration' or 'validation', not {split!r}")
    path = cache_path(n, seqlen, seed, split)
    if path.is_file():
        try:  # data only: tensors, tuples, dicts and numbers, never code
            return torch.load(path, weights_only=True)
        except Exception as e:
            raise ValueError(f"cache file {path} is corrupt or not a Gram cache ({type(e).__name__}: {e}); "
                             "delete it to capture again") from None
    data = capture(n, seqlen, seed) if split == "calibration" else capture(n, seqlen, seed, split=split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


def problem(data: dict, layer: int, linear: str, structure, **target) -> solvers.LayerProblem:
    """The :class:`solvers.LayerProblem` of ``model.layers.{layer}.{linear}`` (e.g. ``"mlp.down_proj"``)."""
    name = f"model.layers.{layer}.{linear}"
    source = next(k for k, shared in SHARED_INPUTS.items() if linear in shared)
    H, mean, count = data["grams"][f"model.layers.{layer}.{source}"]
    W = data["weights"][name]
    if callable(structure):
        structure = structure(W.shape[1])
    return solvers.LayerProblem(W, H, structure, input_mean=mean.float(), n_samples=count, **target)


def n_layers(data: dict) -> int:
    return 1 + max(int(k.split(".")[2]) for k in data["weights"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("calibration", "validation"), default="calibration")
    args = parser.parse_args()
    data = load(args.n, args.seqlen, args.seed, args.split)
    print(f"{len(data['grams'])} Gram matrices from {data['n']}x{data['seqlen']} tokens; capture {data['seconds']:.1f} s")
    print(f"cache: {cache_path(args.n, args.seqlen, args.seed, args.split)}")
