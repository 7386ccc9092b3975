"""What a checkpoint holds and what pruning it would do: the data behind ``slim inspect``.

:func:`inspect_checkpoint` gathers everything as one plain, JSON-ready dict (no rendering):
metadata and lineage, params/MACs/FLOPs, the distribution of the pruning scores |γ|
(histogram of log10|γ|, exact zeros counted apart, quantiles), a per-BatchNorm table, and
the what-if table (one row per ratio: threshold, channels, params and FLOPs kept, layers
that would be emptied) with the bound below which no ratio empties a layer. ``docs/inspect.md``
describes every key.

The what-if rows come from :func:`slimcli.prune.what_if` (closed form checked by surgery,
on a meta-device twin of the model; see :mod:`slimcli.prune.whatif`), the safe bound from
:func:`slimcli.prune.safe_below`; the ratio and min-channels are checked by
:func:`slimcli.prune.check_ratio` and :func:`slimcli.prune.check_min_channels`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimcli.checkpoint import Checkpoint, load_checkpoint
from slimcli.errors import UsageError
from slimcli.flows.prune import structure_coupling
from slimcli.measure import measure
from slimcli.model import build_model
from slimcli.prune import (
    BNInfo,
    analyze,
    check_min_channels,
    check_ratio,
    compute_keep,
    fast_twin,
    gamma_scores,
    ratio_grid,
    safe_below,
    what_if,
)

#: Quantiles of |γ| reported under ``gamma.quantiles``.
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
#: Cut-offs for ``gamma.below`` (how many |γ| are smaller than each).
BELOW = (1e-4, 1e-3, 1e-2, 1e-1)

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# arguments


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise UsageError(f"bins must be an integer >= 1, got {bins!r}")
    return bins


# ----------------------------------------------------------------------------------------------
# |γ| statistics


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def gamma_summary(scores: Mapping[str, Tensor], bins: int = 20) -> dict[str, Any]:
    """Distribution of the pooled scores: counts, exact zeros, histogram of log10|γ|, quantiles.

    The histogram covers the nonzero finite scores only (log10 0 is −∞), with ``bins``
    equal-width bins from the smallest to the largest log10|γ|; its counts sum to
    ``count − zeros − nonfinite``. ``below`` counts the scores under 1e-4 … 1e-1 (zeros
    included).
    """
    _check_bins(bins)
    flat = torch.cat([s.reshape(-1) for s in scores.values()]) if scores else torch.zeros(0)
    flat = flat.detach().to("cpu", torch.float64).abs()
    finite = flat[torch.isfinite(flat)]
    zeros = int((finite == 0).sum())
    nonzero = finite[finite > 0]
    edges: list[float] = []
    counts: list[int] = []
    if nonzero.numel():
        logs = torch.log10(nonzero).numpy()
        lo, hi = float(logs.min()), float(logs.max())
        if hi - lo < 1e-9:  # all scores equal: one visible bin around the value
            lo, hi = lo - 0.5, hi + 0.5
        hist, bin_edges = np.histogram(logs, bins=bins, range=(lo, hi))
        counts, edges = [int(c) for c in hist], [float(e) for e in bin_edges]
    quantiles: dict[str, float | None] = {}
    if finite.numel():
        qs = torch.quantile(finite, torch.tensor(QUANTILES, dtype=torch.float64))
        quantiles = {f"{q:g}": float(v) for q, v in zip(QUANTILES, qs.tolist(), strict=True)}
    return {
        "count": int(flat.numel()),
        "zeros": zeros,
        "nonfinite": int(flat.numel() - finite.numel()),
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "mean": float(finite.mean()) if finite.numel() else None,
        "below": {f"{t:g}": int((finite < t).sum()) for t in BELOW},
        "quantiles": quantiles,
        "histogram": {"log10": True, "bins": bins, "edges": edges, "counts": counts},
    }


# ----------------------------------------------------------------------------------------------
# the per-layer table


def _layer_rows(model: nn.Module, bns: Mapping[str, BNInfo], threshold: float | None,
                kept: Mapping[str, int], bit: Mapping[str, tuple[int, int]],
                emptied: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for name, info in bns.items():
        weight = getattr(model.get_submodule(name), "weight", None)
        g = weight.detach().abs().to("cpu", torch.float64) if weight is not None else None
        row: dict[str, Any] = {
            "name": name, "kind": info.kind, "channels": info.channels, "prunable": info.prunable,
            "reason": info.reason, "producer": info.producer,
            "needs_selection": info.prunable and info.needs_selection, "group": info.group,
            "gamma_min": float(g.min()) if g is not None and g.numel() else None,
            "gamma_median": float(torch.quantile(g, 0.5)) if g is not None and g.numel() else None,
            "gamma_max": float(g.max()) if g is not None and g.numel() else None,
            "zeros": int((g == 0).sum()) if g is not None else None,
            "under_threshold": None, "kept": info.channels, "min_channels_bit": None, "emptied": False,
        }
        if info.prunable and g is not None:
            row["under_threshold"] = int((g <= threshold).sum()) if threshold is not None else 0
            row["kept"] = kept.get(name, info.channels)
            row["min_channels_bit"] = list(bit[name]) if name in bit else None
            row["emptied"] = name in emptied
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# everything


def _json_safe(value: Any) -> Any:
    """The same structure with non-finite floats as None, tuples as lists (strict JSON)."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def inspect_checkpoint(
    source: Checkpoint | str | os.PathLike[str],
    *,
    ratio: float = 0.5,
    min_channels: int = 1,
    bins: int = 20,
    ratios: Iterable[float] | None = None,
    log: Log | None = None,
    coupling: str | None = None,
    round_to: int = 1,
    selections: str = "gather",
) -> dict[str, Any]:
    """Everything ``slim inspect`` shows, as a JSON-ready dict (keys in ``docs/inspect.md``).

    ``ratio`` picks the threshold of the per-layer "under threshold" and "kept" columns (it
    is added to the what-if ``ratios``, default 0.05 … 0.95); ``min_channels`` is the floor
    ``slim prune`` keeps per layer; ``bins`` the histogram's bin count. ``log`` receives
    progress messages.
    """
    log = log or _quiet
    ratio = check_ratio(ratio)
    check_min_channels(min_channels)
    _check_bins(bins)
    grid = [*(check_ratio(r, allow_zero=True) for r in (ratio_grid() if ratios is None else ratios)), ratio]
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    shape = ckpt.input_shape
    coupling = structure_coupling(ckpt, coupling)
    log("rebuilding the model")
    model = build_model(ckpt)
    log("measuring the model")
    dense = measure(model, shape)
    twin = fast_twin(model, shape, dense, log)
    log("analysing the graph")
    bns = analyze(twin, shape, coupling=coupling).bns
    raw = gamma_scores(model, bns, None)  # each channel's own |γ|: the distribution
    scores = gamma_scores(model, bns)  # coupled groups scored as one: what the rule compares
    total = sum(s.numel() for s in scores.values())

    threshold: float | None = None
    kept: dict[str, int] = {}
    bit: dict[str, tuple[int, int]] = {}
    emptied: list[str] = []
    if scores:
        plan = compute_keep(model, "ratio", ratio, max(min_channels, 1), bns=bns, coupling=coupling,
                            round_to=round_to)
        threshold, bit, emptied = plan.threshold, dict(plan.min_channels_bit), list(plan.emptied)
        kept = plan.widths
        if min_channels == 0:  # no floor: an emptied layer keeps nothing (prune would refuse)
            kept.update(dict.fromkeys(emptied, 0))
            bit = {}
    rows, method = what_if(model, shape, grid, min_channels=min_channels, bns=bns,
                           twin=twin, dense=dense, check_ratios=[ratio], log=log, coupling=coupling,
                           round_to=round_to, selections=selections)
    bound, first = safe_below(scores)
    under = sum(int((s <= threshold).sum()) for s in scores.values()) if threshold is not None else 0
    meta = {k: v for k, v in ckpt.meta.items() if k != "lineage"}
    doc = {
        "path": str(ckpt.path) if ckpt.path is not None else None,
        "sha256": ckpt.sha256,
        "meta": meta,
        "lineage": ckpt.lineage,
        "model": {
            "arch": ckpt.meta.get("arch"), "stage": ckpt.stage, "input_shape": list(shape),
            "params": dense.params, "macs": dense.macs, "flops": dense.flops,
            "batchnorms": len(bns), "prunable_batchnorms": len(scores), "prunable_channels": total,
        },
        "settings": {"ratio": ratio, "min_channels": min_channels, "bins": bins, "coupling": coupling,
                     "round_to": round_to},
        "at_ratio": {
            "ratio": ratio, "threshold": threshold, "channels_total": total,
            "channels_under": under,
            "channels_kept": sum(kept.values()), "emptied": emptied,
            "min_channels_bit": {k: list(v) for k, v in bit.items()},
        },
        "gamma": gamma_summary(raw, bins),
        "layers": _layer_rows(model, bns, threshold, kept, bit, emptied),
        "what_if": [row.as_dict() for row in rows],
        "what_if_method": method,
        "safe_below": bound,
        "first_emptied": first,
    }
    return _json_safe(doc)


__all__ = [
    "BELOW",
    "QUANTILES",
    "gamma_summary",
    "inspect_checkpoint",
]
