"""Generic channel pruning (network slimming) for any torch.fx-traceable model.

The workflow: :func:`prunable_bns` finds out which BatchNorms can lose channels (and why
not, for the others); :func:`compute_keep` picks the channels to keep under a rule (global
ratio, threshold, or a params/FLOPs target); :func:`prune_model` rebuilds the slim model and
reports per-layer widths. :func:`apply_widths` rebuilds the same structure from a fresh
dense model and the widths alone, so a slim checkpoint loads with ``strict=True``.
:func:`masked_dense` is the reference the slim model must equal (pruned γ and β zeroed), and
:func:`what_if` / :func:`safe_below` feed ``slim inspect``. :func:`check_ratio`,
:func:`check_min_channels` and :func:`check_rule` validate the rules' values for the library
and the command line alike. See ``docs/pruning.md``.
"""

from __future__ import annotations

from slimcli.prune.fold import ShiftFold
from slimcli.prune.graph import BNInfo, SlimTracer, analyze, prunable_bns, trace
from slimcli.prune.rules import (
    RULE_VALUES,
    RULES,
    KeepPlan,
    check_min_channels,
    check_ratio,
    check_round_to,
    check_rule,
    compute_keep,
    gamma_scores,
    ratio_threshold,
)
from slimcli.prune.select import ChannelSelection
from slimcli.prune.surgery import LayerReport, PruneReport, Widths, apply_widths, masked_dense, prune_model
from slimcli.prune.whatif import WhatIfRow, fast_twin, meta_twin, ratio_grid, safe_below, what_if

__all__ = [
    "RULES",
    "RULE_VALUES",
    "BNInfo",
    "ChannelSelection",
    "KeepPlan",
    "LayerReport",
    "PruneReport",
    "ShiftFold",
    "SlimTracer",
    "WhatIfRow",
    "Widths",
    "analyze",
    "apply_widths",
    "check_min_channels",
    "check_ratio",
    "check_round_to",
    "check_rule",
    "compute_keep",
    "fast_twin",
    "gamma_scores",
    "masked_dense",
    "meta_twin",
    "prunable_bns",
    "prune_model",
    "ratio_grid",
    "ratio_threshold",
    "safe_below",
    "trace",
    "what_if",
]
