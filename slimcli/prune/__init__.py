"""Generic channel pruning (network slimming) for any torch.fx-traceable model.

The workflow: :func:`prunable_bns` finds out which BatchNorms can lose channels (and why
not, for the others); :func:`compute_keep` picks the channels to keep under a rule (global
ratio, threshold, or a params/FLOPs target); :func:`prune_model` rebuilds the slim model and
reports per-layer widths. :func:`apply_widths` rebuilds the same structure from a fresh
dense model and the widths alone, so a slim checkpoint loads with ``strict=True``.
:func:`masked_dense` is the reference the slim model must equal (pruned γ and β zeroed), and
:func:`what_if` / :func:`max_safe_ratio` feed ``slim inspect``. See ``docs/pruning.md``.
"""

from __future__ import annotations

from slimcli.prune.fold import ShiftFold
from slimcli.prune.graph import BNInfo, SlimTracer, analyze, prunable_bns, trace
from slimcli.prune.rules import (
    RULES,
    KeepPlan,
    WhatIfRow,
    compute_keep,
    gamma_scores,
    max_safe_ratio,
    ratio_grid,
    ratio_threshold,
    what_if,
)
from slimcli.prune.select import ChannelSelection
from slimcli.prune.surgery import LayerReport, PruneReport, Widths, apply_widths, masked_dense, prune_model

__all__ = [
    "RULES",
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
    "compute_keep",
    "gamma_scores",
    "masked_dense",
    "max_safe_ratio",
    "prunable_bns",
    "prune_model",
    "ratio_grid",
    "ratio_threshold",
    "trace",
    "what_if",
]
