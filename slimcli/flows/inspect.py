"""What a checkpoint holds and what pruning it would do: the data behind ``slim inspect``.

:func:`inspect_checkpoint` gathers everything as one plain, JSON-ready dict (no rendering):
metadata and lineage, params/MACs/FLOPs, the distribution of the pruning scores |γ|
(histogram of log10|γ|, exact zeros counted apart, quantiles), a per-BatchNorm table, and
the what-if table (one row per ratio: threshold, channels, params and FLOPs kept, layers
that would be emptied) with the largest ratio that empties no layer. ``docs/inspect.md``
describes every key.

The what-if numbers are those of the slim model ``slim prune --ratio`` would build. Building
19 slim models of a big network is slow on a CPU, so :func:`what_if_table` computes them in
closed form from the graph analysis (a conv or linear between two BatchNorms scales with
kept_out/out · kept_in/in, a BatchNorm with its kept channels) and checks that formula by
real surgery at the most pruned ratio and at the chosen one; if the check disagrees, or the
model has a structure the formula does not cover, every row is built by surgery instead.
Surgery and measuring run on a twin of the model on PyTorch's ``meta`` device (shapes only,
no arithmetic) when its counts match the real model's.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from slimcli.checkpoint import Checkpoint, load_checkpoint
from slimcli.errors import UsageError
from slimcli.measure import Measurement, measure
from slimcli.model import build_model
from slimcli.prune import (
    BNInfo,
    WhatIfRow,
    analyze,
    apply_widths,
    compute_keep,
    gamma_scores,
    max_safe_ratio,
    ratio_grid,
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


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float strictly between 0 and 1 (else :class:`UsageError`)."""
    value = float(ratio)
    if not 0 < value < 1:
        raise UsageError(f"ratio must be strictly between 0 and 1 (a fraction of the channels), got {ratio}")
    return value


def _check_int(name: str, value: int, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UsageError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


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
    _check_int("bins", bins, 1)
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
# the what-if table


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device.

    Same classes, names and shapes, no data: tracing, surgery and FLOP counting on it cost
    no arithmetic and no memory. The model itself is not copied tensor by tensor.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _same_counts(a: Measurement, b: Measurement) -> bool:
    return a.params == b.params and a.macs == b.macs


@dataclass(frozen=True)
class _Scaled:
    """One conv/linear whose output (``out_bn``) and/or input (``in_bn``) channels follow a BatchNorm."""

    weight: int  # numel of the weight
    bias: int  # numel of the bias (0 if none)
    macs: int
    out_bn: str | None
    in_bn: str | None


class _CostFormula:
    """Params and MACs of the slim model for given widths, in closed form (see the module docstring)."""

    def __init__(self, bn_params: dict[str, tuple[int, int]], layers: list[_Scaled],
                 channels: dict[str, int], dense: Measurement) -> None:
        self.bn_params = bn_params  # BN name → (channels, params of the BN)
        self.layers = layers
        self.channels = channels
        self.dense = dense

    @classmethod
    def build(cls, model: nn.Module, bns: Mapping[str, BNInfo], dense: Measurement) -> _CostFormula | None:
        """The formula for ``model``, or None where its structure is outside what the formula covers."""
        modules = dict(model.named_modules())
        macs = {row.name: row.macs for row in dense.per_layer}
        roles: dict[str, dict[str, str]] = {}
        bn_params: dict[str, tuple[int, int]] = {}
        channels: dict[str, int] = {}
        for name, info in bns.items():
            if not info.prunable:
                continue
            bn = modules.get(name)
            if bn is None:
                return None
            channels[name] = info.channels
            bn_params[name] = (info.channels, sum(p.numel() for p in bn.parameters(recurse=False)))
            producer = info.producer
            if producer is not None and roles.setdefault(producer, {}).setdefault("out", name) != name:
                return None  # one layer producing for two BatchNorms: not a shape the formula knows
            for consumer in info.consumers:
                if roles.setdefault(consumer, {}).setdefault("in", name) != name:
                    return None
        layers: list[_Scaled] = []
        for layer_name, role in roles.items():
            m = modules.get(layer_name)
            if not isinstance(m, _ConvNd | nn.Linear) or getattr(m, "groups", 1) != 1:
                return None
            params = dict(m.named_parameters(recurse=False))
            if set(params) - {"weight", "bias"} or m.weight.dim() < 2:
                return None
            w, b = m.weight, params.get("bias")
            out_bn, in_bn = role.get("out"), role.get("in")
            if out_bn is not None and w.shape[0] != channels[out_bn]:
                return None
            if b is not None and (b.dim() != 1 or b.numel() != w.shape[0]):
                return None
            if in_bn is not None and w.shape[1] % channels[in_bn] != 0:
                return None
            layers.append(_Scaled(w.numel(), b.numel() if b is not None else 0, macs.get(layer_name, 0),
                                  out_bn, in_bn))
        return cls(bn_params, layers, channels, dense)

    def __call__(self, widths: Mapping[str, int]) -> tuple[int, int]:
        """(params, FLOPs) of the slim model with ``widths`` (BN name → kept channels)."""
        params, macs = self.dense.params, self.dense.macs
        for name, (c, p) in self.bn_params.items():
            params -= p - p // c * widths[name]
        for layer in self.layers:
            num, den = 1, 1
            for bn in (layer.out_bn, layer.in_bn):
                if bn is not None:
                    num, den = num * widths[bn], den * self.channels[bn]
            # weight and MACs are products of the out and in channel counts: exact integer scaling
            params -= layer.weight - layer.weight // den * num
            macs -= layer.macs - layer.macs // den * num
            if layer.out_bn is not None:
                params -= layer.bias - layer.bias // self.channels[layer.out_bn] * widths[layer.out_bn]
        return params, 2 * macs


def _surgery_cost(twin: nn.Module, widths: Mapping[str, int], shape: Sequence[int]) -> tuple[int, int]:
    slim = measure(apply_widths(twin, dict(widths), input_shape=shape), shape)
    return int(slim.params), int(slim.flops)


def _fraction(part: int | None, whole: int) -> float | None:
    if part is None:
        return None
    return part / whole if whole else 1.0


def what_if_table(
    model: nn.Module,
    input_shape: Sequence[int],
    ratios: Iterable[float] | None = None,
    *,
    min_channels: int = 1,
    bns: Mapping[str, BNInfo] | None = None,
    twin: nn.Module | None = None,
    dense: Measurement | None = None,
    check_ratios: Iterable[float] = (),
    formula: bool = True,
    log: Log | None = None,
) -> tuple[list[WhatIfRow], dict[str, Any]]:
    """The rows of :func:`slimcli.prune.what_if` (same numbers), computed fast.

    ``twin`` (a :func:`meta_twin` of ``model``, or ``model``) is where slim models are built
    and measured; ``bns`` and ``dense`` save a second analysis and measurement. With
    ``formula`` the params/FLOPs come from the closed form, checked by surgery at the most
    pruned row and at ``check_ratios``; otherwise (or if the check fails) every row is built.
    Returns the rows and how they were computed (``{"method", "checked_ratios", "note"}``).
    """
    log = log or _quiet
    _check_int("min_channels", min_channels, 0)
    shape = tuple(input_shape)
    twin = twin if twin is not None else model
    if bns is None:
        bns = analyze(twin, shape).bns
    dense = dense if dense is not None else measure(twin, shape)
    scores = gamma_scores(model, bns)
    grid = sorted({float(r) for r in (ratios if ratios is not None else ratio_grid())})
    if not scores or not grid:
        return [], {"method": "none", "checked_ratios": [], "note": "nothing to prune"}

    plans: list[tuple[float, float | None, dict[str, int], list[str], bool]] = []
    for ratio in grid:
        # compute_keep is exactly what `slim prune --ratio` uses; with min_channels 0 it refuses
        # a ratio that empties a layer, and the layers it would empty do not depend on min_channels
        plan = compute_keep(model, "ratio", ratio, max(min_channels, 1), bns=bns)
        widths = plan.widths
        exists = not (plan.emptied and min_channels == 0)
        if not exists:  # no model: the row counts the channels the rule alone keeps
            widths.update(dict.fromkeys(plan.emptied, 0))
        plans.append((ratio, plan.threshold, widths, list(plan.emptied), exists))

    costs: dict[float, tuple[int, int]] = {}
    info: dict[str, Any] = {"method": "surgery", "checked_ratios": [], "note": None}
    calc = _CostFormula.build(twin, bns, dense) if formula else None
    if formula and calc is None:
        info["note"] = "the closed form does not cover this model's structure; every row was built"
    if calc is not None:
        built = [p for p in plans if p[4]]
        checks = {r for r in check_ratios if any(p[0] == r for p in built)}
        if built:
            checks.add(built[-1][0])  # the most pruned model: every layer any row shrinks shrinks here
        ok = True
        for ratio, _, widths, _, _ in (p for p in plans if p[0] in sorted(checks)):
            log(f"checking the closed form by surgery at ratio {ratio:g}")
            if _surgery_cost(twin, widths, shape) != calc(widths):
                ok = False
                break
        if ok:
            info.update(method="formula", checked_ratios=sorted(checks))
            costs = {ratio: calc(widths) for ratio, _, widths, _, exists in plans if exists}
        else:
            info["note"] = "the closed form disagreed with surgery; every row was built"
    if not costs:
        built = [p for p in plans if p[4]]
        for i, (ratio, _, widths, _, _) in enumerate(built, 1):
            log(f"building the slim model for ratio {ratio:g} ({i}/{len(built)})")
            costs[ratio] = _surgery_cost(twin, widths, shape)

    rows = []
    for ratio, threshold, widths, emptied, exists in plans:
        params, flops = costs[ratio] if exists else (None, None)
        rows.append(WhatIfRow(
            ratio=ratio, threshold=threshold, channels_kept=sum(widths.values()),
            channels_total=sum(b.channels for b in bns.values() if b.prunable),
            params=params, params_kept=_fraction(params, dense.params),
            flops=flops, flops_kept=_fraction(flops, dense.flops), emptied=tuple(emptied),
        ))
    return rows, info


def safe_bound(scores: Mapping[str, Tensor]) -> tuple[float | None, list[str]]:
    """The bound b = c/total with: ratio p empties no layer ⇔ p < b; and the layers emptied first.

    A layer is emptied once the threshold reaches its largest |γ|; the first to go is the
    one whose largest |γ| is smallest. With c scores below that value, ratio p keeps it
    alive iff ⌊p·total⌋ < c, i.e. p < c/total (up to how ⌊p·total⌋ rounds in floating
    point when p is within an ulp of the bound).
    """
    if not scores:
        return None, []
    tops = {name: float(s.max()) for name, s in scores.items() if s.numel()}
    weakest = min(tops.values())
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    below = int((flat < weakest).sum())
    return below / flat.numel(), [n for n, t in tops.items() if t == weakest]


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
            "needs_selection": info.prunable and info.needs_selection,
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


def _twin_for(model: nn.Module, shape: Sequence[int], dense: Measurement, log: Log) -> nn.Module:
    """A meta-device twin when it counts exactly like ``model``; ``model`` itself otherwise."""
    try:
        twin = meta_twin(model)
        if _same_counts(measure(twin, shape), dense):
            return twin
        log("the meta-device twin counts differently; measuring on the real model")
    except Exception as exc:  # a model that cannot run on meta tensors (data-dependent code)
        log(f"the model does not run on the meta device ({type(exc).__name__}); measuring on the real model")
    return model


def inspect_checkpoint(
    source: Checkpoint | str | os.PathLike[str],
    *,
    ratio: float = 0.5,
    min_channels: int = 1,
    bins: int = 20,
    ratios: Iterable[float] | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Everything ``slim inspect`` shows, as a JSON-ready dict (keys in ``docs/inspect.md``).

    ``ratio`` picks the threshold of the per-layer "under threshold" and "kept" columns (it
    is added to the what-if ``ratios``, default 0.05 … 0.95); ``min_channels`` is the floor
    ``slim prune`` keeps per layer; ``bins`` the histogram's bin count. ``log`` receives
    progress messages.
    """
    log = log or _quiet
    ratio = check_ratio(ratio)
    _check_int("min_channels", min_channels, 0)
    _check_int("bins", bins, 1)
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    shape = ckpt.input_shape
    log("rebuilding the model")
    model = build_model(ckpt)
    log("measuring the model")
    dense = measure(model, shape)
    twin = _twin_for(model, shape, dense, log)
    log("analysing the graph")
    bns = analyze(twin, shape).bns
    scores = gamma_scores(model, bns)
    total = sum(s.numel() for s in scores.values())

    threshold: float | None = None
    kept: dict[str, int] = {}
    bit: dict[str, tuple[int, int]] = {}
    emptied: list[str] = []
    if scores:
        plan = compute_keep(model, "ratio", ratio, max(min_channels, 1), bns=bns)
        threshold, bit, emptied = plan.threshold, dict(plan.min_channels_bit), list(plan.emptied)
        kept = plan.widths
        if min_channels == 0:  # no floor: an emptied layer keeps nothing (prune would refuse)
            kept.update(dict.fromkeys(emptied, 0))
            bit = {}
    grid = set(ratio_grid()) if ratios is None else {float(r) for r in ratios}
    rows, method = what_if_table(model, shape, sorted(grid | {ratio}), min_channels=min_channels, bns=bns,
                                 twin=twin, dense=dense, check_ratios=[ratio], log=log)
    bound, first = safe_bound(scores)
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
        "settings": {"ratio": ratio, "min_channels": min_channels, "bins": bins},
        "at_ratio": {
            "ratio": ratio, "threshold": threshold, "channels_total": total,
            "channels_under": under,
            "channels_kept": sum(kept.values()), "emptied": emptied,
            "min_channels_bit": {k: list(v) for k, v in bit.items()},
        },
        "gamma": gamma_summary(scores, bins),
        "layers": _layer_rows(model, bns, threshold, kept, bit, emptied),
        "what_if": [row.as_dict() for row in rows],
        "what_if_method": method,
        "max_safe_ratio": max_safe_ratio(model, shape, bns=bns) if scores else None,
        "safe_below": bound,
        "first_emptied": first,
    }
    return _json_safe(doc)


__all__ = [
    "BELOW",
    "QUANTILES",
    "check_ratio",
    "gamma_summary",
    "inspect_checkpoint",
    "meta_twin",
    "safe_bound",
    "what_if_table",
]
