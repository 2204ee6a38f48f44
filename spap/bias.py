"""Giving an output linear a bias, for solvers that compensate into it (FLAP).

FLAP moves the pruned inputs' mean contribution into the output linear's bias (``b ← b + (W − Ŵ) μ``).
OPT and GPT-2 have that bias; the Llama family's ``down_proj`` and ``o_proj`` have none, and writing the
solution without it would drop the compensation.  Where the model's config has a switch that makes
stock transformers build the linear with a bias, the pruned model gets one:

- ``mlp_bias`` (Llama) gives gate_proj, up_proj *and* down_proj a bias;
- ``attention_bias`` (Llama, Qwen3, Gemma 1/2/3) gives q_proj, k_proj, v_proj *and* o_proj one.

The switch is turned on in the config and every linear it switches on, in every block, gets a zero bias
(the output linear's then receives the compensation), so the model computes what it computed before and
saves and reloads with stock ``from_pretrained``.  Which linears a switch turns on is not assumed: it is
read from the family's own decoder-layer class, built with the switch on, on the meta device
(:func:`switched_linears`).  A family with no such switch (Mistral; Qwen2, whose ``o_proj`` and MLP
never have a bias; the MLP of Qwen3 and Gemma) is refused before any work (:func:`check_compensation`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import solvers

from .adapters import Adapter, LinearView
from .checks import InvalidArgumentError
from .units import kinds as unit_kinds

# The config switch that may give a unit kind's output linear a bias in stock transformers.
SWITCHES = {"mlp": "mlp_bias", "heads": "attention_bias"}
WHAT = {"mlp": "MLP's output linear", "heads": "attention's output linear", "experts": "experts' down projection"}


@dataclass(frozen=True)
class BiasSwitch:
    """A config field (``field``) that, set to True, gives the linears named ``linears`` (module names
    inside a decoder block) a bias; ``kind`` is the unit kind whose output linear needs it."""

    kind: str
    field: str
    linears: tuple[str, ...]


def switched_linears(adapter: Adapter, field: str) -> tuple[str, ...]:
    """Names (inside a decoder block) of the linears without a bias that get one when ``config.field``
    is True, read from the family's decoder-layer class built with the switch on (on the meta device,
    so no memory is used); ``()`` when the config has no such boolean field or the class cannot be
    built from the config alone."""
    config = adapter.config
    if not isinstance(getattr(config, field, None), bool):
        return ()
    probe_config = copy.deepcopy(config)
    setattr(probe_config, field, True)
    block = adapter.blocks()[0]
    try:
        with torch.device("meta"):
            probe = type(block)(probe_config, layer_idx=0)
    except Exception:  # a layer class that needs more than (config, layer_idx): no switch we can verify
        return ()
    before = {n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.bias is None}
    after = {n for n, m in probe.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    return tuple(sorted(before & after))


def needed_switches(adapter: Adapter, kind_names: Sequence[str]) -> dict[str, tuple[str, BiasSwitch | None]]:
    """For every unit kind in ``kind_names`` whose output linear has no bias: that linear's name inside a
    block and the switch that gives it one (None: the family has none).  Kinds whose output linear has a
    bias are left out."""
    block = adapter.blocks()[0]
    names = {id(m): n for n, m in block.named_modules()}
    out: dict[str, tuple[str, BiasSwitch | None]] = {}
    for name, kind in unit_kinds(adapter, kind_names).items():
        if name == "experts":  # 3-D parameters without a bias, which no config switch gives one
            experts = kind.experts(block).module
            out[name] = (f"{names[id(experts)]}.down_proj", None)
            continue
        linear = kind.output_linear(block)
        if LinearView(linear).bias is not None:
            continue
        field = SWITCHES[name]
        linears = switched_linears(adapter, field)
        out[name] = (names[id(linear)], BiasSwitch(name, field, linears) if names[id(linear)] in linears else None)
    return out


def check_compensation(adapter: Adapter, kind_names: Sequence[str], methods: Sequence[str], caller: str,
                       argument: str = "method") -> list[BiasSwitch]:
    """The switches a prune with ``methods`` on ``kind_names`` must turn on (empty when no method
    compensates into a bias, or every output linear has one), or :class:`InvalidArgumentError` naming
    ``argument`` when a method compensates into a bias (FLAP) that an output linear lacks and the family
    cannot give it.  Changes nothing."""
    compensating = [m for m in methods if solvers.get_solver(m).compensates_bias]
    if not compensating:
        return []
    switches = []
    for name, (linear, switch) in needed_switches(adapter, kind_names).items():
        if switch is None:
            raise InvalidArgumentError(
                f"The {argument!r} argument of {caller} uses {compensating[0]!r}, which moves the pruned inputs' mean "
                f"into the bias of the {WHAT[name]} ({linear}); this "
                f"{adapter.config.model_type} model's {linear} has no bias and its config has no switch "
                f"{'(' + repr(SWITCHES[name]) + ') ' if name in SWITCHES else ''}that gives it one in stock "
                "transformers, so the compensation would be lost. "
                "Use another method or structure.")
        switches.append(switch)
    return switches


def add_biases(adapter: Adapter, switches: Sequence[BiasSwitch]) -> None:
    """Turn every switch on in the config and give every linear it switches on, in every block, a zero
    bias (same dtype and device as its weight): the model's outputs do not change."""
    for switch in switches:
        for block in adapter.blocks():
            modules = dict(block.named_modules())
            for name in switch.linears:
                m = modules[name]
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                          requires_grad=m.weight.requires_grad)
        setattr(adapter.config, switch.field, True)
