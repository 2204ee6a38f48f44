"""One rank of a data-parallel prune of a tiny model, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT STRUCTURE [--fail-rank R]
        [--sequences N]

Each rank prunes the same tiny random Llama (:func:`tiny_model`) on its consecutive shard of
:func:`calibration` (``N`` sequences in all, default 8) and writes ``OUT/rank{r}.pt``: the pruned state dict,
the report's per-layer records and the warnings it raised, or the error it stopped with.  ``--fail-rank R``
makes rank ``R`` fail while propagating through block 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import spap
import spap.pipeline
from spap.distributed import shard

METRIC_WINDOWS = 3  # fewer than one rank's shard: the metric's sequences all come from rank 0


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=3, vocab_size=128,
                                      max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def calibration(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def prune(model, calib, structure: str, **options):
    """The prune both the ranks and the single-process reference run (batches of 2 sequences, so that each
    rank's batches are the reference's; float64 Gram products)."""
    return spap.prune_layerwise(model, calib, 0.5, structure=structure, batch_size=2, gram_dtype=torch.float64,
                                device="cpu", metric_windows=METRIC_WINDOWS, progress=False, **options)


def plant_failure(rank: int) -> None:
    """Make this process fail with ``ValueError("planted failure on rank R")`` while propagating through
    block 1 (the worker's ``--fail-rank``; the command-line test's ``sitecustomize``)."""
    propagate = spap.pipeline._propagate

    def failing(adapter, block, index, *rest):
        if index == 1:
            raise ValueError(f"planted failure on rank {rank}")
        return propagate(adapter, block, index, *rest)

    spap.pipeline._propagate = failing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("structure")
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--sequences", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.fail_rank == rank:
        plant_failure(rank)
    model = tiny_model()
    calib = calibration(args.sequences)
    result = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, report = prune(model, calib[shard(len(calib), world, rank)], args.structure)
        result.update(records=[(r.block, r.target, r.kept, r.total) for r in report.layers], settings=report.settings,
                      warnings=[str(w.message) for w in caught])
    except Exception as error:  # noqa: BLE001 - the test reads what each rank stopped with
        result.update(error=f"{type(error).__name__}: {error}")
    result["state"] = model.state_dict()
    torch.save(result, Path(args.out) / f"rank{rank}.pt")
    dist.destroy_process_group()
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    main()
