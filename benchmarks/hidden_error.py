"""How far a pruned model's last hidden state is from the dense model's, on calibration and on held-out
windows: the quantity a layer-wise target tries to keep small, measured on the whole model.

For each ``--target`` of ``prune_layerwise`` the script prunes SmolLM2-135M (MLP channels, SPAP) on
``--n`` C4 calibration windows and prints the relative squared error of the last hidden state against
the dense model's on 8 of those windows and on 8 validation windows (``spap.data.validation_documents``,
never the evaluation sets), with the validation next-token NLL.

    python benchmarks/hidden_error.py                       # targets "pruned" and "dense", 16x512, 30%
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import spap
from spap.data import calibration_set, validation_documents


def last_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["pruned", "dense"], choices=["pruned", "dense"])
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = spap.load_model("smollm2")
    calib = calibration_set("c4", tok, n=args.n, seqlen=args.seqlen, seed=0)
    held = calibration_set(validation_documents(tok, n=args.n, seqlen=args.seqlen, seed=0), tok, n=8,
                           seqlen=args.seqlen, seed=1)
    dense_c, dense_h = last_hidden(model, calib[:8]), last_hidden(model, held)
    print(f"# SmolLM2-135M, spap, {args.sparsity:.0%} MLP channels, calibration {args.n}x{args.seqlen}, "
          f"{args.threads} threads")
    print(f"{'target':<8}{'calib err':>11}{'held-out err':>14}{'held-out NLL':>14}{'seconds':>9}")
    for target in args.targets:
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        pruned, _ = spap.prune_layerwise(pruned, calib, args.sparsity, target=target, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            nll = float(pruned(input_ids=held, labels=held).loss)
        print(f"{target:<8}{relative_error(last_hidden(pruned, calib[:8]), dense_c):>11.4f}"
              f"{relative_error(last_hidden(pruned, held), dense_h):>14.4f}{nll:>14.4f}{seconds:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
