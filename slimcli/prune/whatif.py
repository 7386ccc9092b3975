"""What ``--ratio R`` would do, for a grid of ratios: the what-if table, and the safe bound.

:func:`what_if` gives one :class:`WhatIfRow` per ratio: the threshold, the channels kept,
and the params and FLOPs of the slim model ``slim prune --ratio R`` would build (with the
same :func:`~slimcli.prune.rules.compute_keep`), plus the layers the ratio alone empties.

Building 19 slim models of a big network is slow on a CPU, so by default (``formula=True``)
the params and FLOPs come in closed form from the graph analysis (a conv or linear between
two BatchNorms scales with kept_out/out · kept_in/in, a BatchNorm with its kept channels),
checked by real surgery at the most pruned ratio and at ``check_ratios``; if the check
disagrees, or the model has a structure the formula does not cover, every row is built by
surgery instead. ``formula=False`` builds every row by surgery. Surgery and measuring run on
a twin of the model on PyTorch's ``meta`` device (shapes only, no arithmetic) when its counts
match the real model's (:func:`meta_twin`, :func:`fast_twin`).

:func:`safe_below` is the one "largest safe ratio" number: the bound b such that a ratio
0 < p < 1 empties no layer exactly when p < b.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from slimcli.errors import UsageError
from slimcli.measure import Measurement, measure
from slimcli.prune.graph import Analysis, BNInfo, analyze
from slimcli.prune.rules import check_min_channels, check_ratio, compute_keep, gamma_scores
from slimcli.prune.surgery import realise, rebuild

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class WhatIfRow:
    """What ``--ratio`` would do: threshold, kept channels, params and FLOPs, emptied layers."""

    ratio: float
    threshold: float | None
    channels_kept: int
    channels_total: int
    params: int | None  # None: no model exists (min_channels 0 and a layer emptied)
    params_kept: float | None  # fraction of the dense model
    flops: int | None
    flops_kept: float | None
    emptied: tuple[str, ...]  # layers the rule alone empties (min_channels keeps them alive)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio, "threshold": self.threshold, "channels_kept": self.channels_kept,
            "channels_total": self.channels_total, "params": self.params, "params_kept": self.params_kept,
            "flops": self.flops, "flops_kept": self.flops_kept, "emptied": list(self.emptied),
        }


def ratio_grid(step: float = 0.05) -> list[float]:
    """0.05, 0.10, …, 0.95 (for ``step`` 0.05): the paper's sweep."""
    if not 0 < step < 1:
        raise UsageError(f"step must be in (0, 1), got {step}")
    n = math.ceil(round(1 / step, 9)) - 1
    return [round(k * step, 10) for k in range(1, n + 1)]


# ----------------------------------------------------------------------------------------------
# where slim models are built and measured


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


def fast_twin(model: nn.Module, input_shape: Sequence[int] | None, dense: Measurement,
              log: Log | None = None) -> nn.Module:
    """A :func:`meta_twin` of ``model`` when it counts exactly like ``dense`` (``model``'s
    measurement); ``model`` itself otherwise (``log`` says why)."""
    log = log or _quiet
    try:
        twin = meta_twin(model)
        if _same_counts(measure(twin, input_shape), dense):
            return twin
        log("the meta-device twin counts differently; measuring on the real model")
    except Exception as exc:  # a model that cannot run on meta tensors (data-dependent code)
        log(f"the model does not run on the meta device ({type(exc).__name__}); measuring on the real model")
    return model


# ----------------------------------------------------------------------------------------------
# the closed form


@dataclass(frozen=True)
class _Layer:
    """One module whose parameters and MACs scale with the kept channels on its two sides."""

    params: int  # parameters that scale with out·in (weights) …
    bias: int  # … and with out only (bias, BatchNorm entries)
    macs: int
    out_roots: Tensor | None  # class of every output channel (None: never shrinks)
    in_roots: Tensor | None  # class of every input channel a weight reads (None: per-channel layer)


class _CostFormula:
    """Params and MACs of the slim model for given keep masks, in closed form.

    A conv/linear keeps ``w · out_k/out · in_k/in`` of its weights and MACs, a depthwise conv
    and a BatchNorm ``out_k/out`` of theirs, where ``out_k``/``in_k`` count the channels whose
    coupled class (:mod:`slimcli.prune.groups`) survives; selections have no parameters.
    """

    def __init__(self, layers: list[_Layer], bn_roots: dict[str, Tensor], dense: Measurement) -> None:
        self.layers = layers
        self.bn_roots = bn_roots
        self.dense = dense

    @classmethod
    def build(cls, model: nn.Module, shape: Sequence[int] | None, dense: Measurement,
              coupling: str = "auto") -> _CostFormula | None:
        """The formula for ``model``, or None where its structure is outside what the formula covers."""
        try:
            analysis = analyze(copy.deepcopy(model), shape, coupling=coupling)
        except Exception:  # the surgery path reports the real problem
            return None
        flow = analysis.flow
        assert flow is not None
        table = flow.table
        macs = {row.name: row.macs for row in dense.per_layer}
        layers: list[_Layer] = []
        for node in analysis.gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = analysis.gm.get_submodule(node.target)
            params = dict(m.named_parameters(recurse=False))
            out_ids = flow.ids.get(node)
            src = node.args[0] if node.args else None
            in_ids = flow.ids.get(src) if src is not None else None
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = sum(p.numel() for p in params.values())
                if out_ids is not None and n:
                    layers.append(_Layer(0, n, 0, table[out_ids], None))
            elif isinstance(m, _ConvNd | nn.Linear):
                if set(params) - {"weight", "bias"} or out_ids is None or in_ids is None:
                    return None
                w, b = m.weight, params.get("bias")
                depthwise = isinstance(m, _ConvNd) and m.groups > 1 and m.groups == m.in_channels
                layers.append(_Layer(w.numel(), b.numel() if b is not None else 0, macs.get(node.target, 0),
                                     table[out_ids], None if depthwise else table[in_ids]))
        return cls(layers, {n: table[ids] for n, (_, ids) in flow.bns.items()}, dense)

    def __call__(self, masks: Mapping[str, Tensor]) -> tuple[int, int]:
        """(params, FLOPs) of the slim model that keeps ``masks`` (BN name → bool mask)."""
        removed = [self.bn_roots[n][~torch.as_tensor(m, dtype=torch.bool)] for n, m in masks.items()
                   if n in self.bn_roots]
        gone = torch.unique(torch.cat(removed)) if removed else torch.empty(0, dtype=torch.long)
        params, macs = self.dense.params, self.dense.macs
        for layer in self.layers:
            out = layer.out_roots.numel()
            out_k = int((~torch.isin(layer.out_roots, gone)).sum()) if gone.numel() else out
            num, den = out_k, out
            if layer.in_roots is not None:
                cin = layer.in_roots.numel()
                num *= int((~torch.isin(layer.in_roots, gone)).sum()) if gone.numel() else cin
                den *= cin
            # weights and MACs are products of the out and in channel counts: exact integer scaling
            params -= layer.params - layer.params // den * num
            macs -= layer.macs - layer.macs // den * num
            params -= layer.bias - layer.bias // out * out_k
        return params, 2 * macs


class _Surgery:
    """(params, FLOPs) of the really rebuilt slim model; the twin is traced once, on first use."""

    def __init__(self, twin: nn.Module, shape: Sequence[int] | None, coupling: str = "auto") -> None:
        self.twin, self.shape, self.coupling = twin, shape, coupling
        self._analysis: Analysis | None = None

    @property
    def analysis(self) -> Analysis:
        if self._analysis is None:
            self._analysis = analyze(copy.deepcopy(self.twin), self.shape, coupling=self.coupling)
        return self._analysis

    def structure(self, masks: Mapping[str, Tensor], selections: str) -> dict[str, Tensor]:
        """The structural masks prune_model builds (zero-realised selections keep their width)."""
        return realise(self.analysis, masks, selections)

    def __call__(self, masks: Mapping[str, Tensor]) -> tuple[int, int]:
        """(params, FLOPs) of the slim structure that keeps the structural ``masks``."""
        widths = {n: int(m.sum()) for n, m in masks.items()}
        slim = rebuild(self.analysis.clone(), widths, name=type(self.twin).__name__, keep=masks)
        cost = measure(slim, self.shape)
        return int(cost.params), int(cost.flops)


def _fraction(part: int | None, whole: int) -> float | None:
    if part is None:
        return None
    return part / whole if whole else 1.0


# ----------------------------------------------------------------------------------------------
# the table


def what_if(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    ratios: Iterable[float] | None = None,
    *,
    min_channels: int = 1,
    formula: bool = True,
    check_ratios: Iterable[float] = (),
    bns: Mapping[str, BNInfo] | None = None,
    twin: nn.Module | None = None,
    dense: Measurement | None = None,
    log: Log | None = None,
    coupling: str = "auto",
    round_to: int = 1,
    selections: str = "gather",
) -> tuple[list[WhatIfRow], dict[str, Any]]:
    """One row per ratio (default :func:`ratio_grid`, sorted, duplicates dropped): the slim
    model ``slim prune --ratio R --min-channels N`` would build, and how it was computed.

    Params and FLOPs are those of the rebuilt slim model with ``min_channels`` (default 1, as
    ``slim prune``); with ``min_channels=0`` a row whose ratio empties a layer has no model
    (``params``/``flops`` None). ``formula`` (default) computes them in closed form, checked
    by surgery at the most pruned row and at ``check_ratios``; ``formula=False`` (or a failed
    check, or a structure the closed form does not cover) builds every row by surgery.

    ``twin`` is where slim models are built and measured (default :func:`fast_twin`: a
    meta-device copy when it counts like ``model``); ``bns`` (of ``model`` or the twin) and
    ``dense`` (the measurement of ``model``) save a second analysis and measurement;
    ``input_shape`` defaults to the model's attribute; ``log`` receives progress messages.

    Returns the rows and ``{"method": "formula" | "surgery" | "none", "checked_ratios",
    "note"}``; a model with nothing to prune gives no rows and method ``"none"``.
    """
    log = log or _quiet
    check_min_channels(min_channels)
    grid = sorted({check_ratio(r, allow_zero=True) for r in (ratios if ratios is not None else ratio_grid())})
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    if twin is None:
        dense = dense if dense is not None else measure(model, shape)
        twin = fast_twin(model, shape, dense, log)
    if bns is None:
        bns = analyze(twin, shape, coupling=coupling).bns
    dense = dense if dense is not None else measure(twin, shape)
    scores = gamma_scores(model, bns)
    if not scores or not grid:
        return [], {"method": "none", "checked_ratios": [], "note": "nothing to prune"}

    plans: list[tuple[float, float | None, dict[str, int], list[str], bool]] = []
    masks: dict[float, dict[str, Tensor]] = {}
    for ratio in grid:
        # compute_keep is exactly what `slim prune --ratio` uses; with min_channels 0 it refuses
        # a ratio that empties a layer, and the layers it would empty do not depend on min_channels
        plan = compute_keep(model, "ratio", ratio, max(min_channels, 1), input_shape=shape, bns=bns,
                            coupling=coupling, round_to=round_to)
        widths = plan.widths
        masks[ratio] = plan.masks  # made structural below (zero-realised selections keep their width)
        exists = not (plan.emptied and min_channels == 0)
        if not exists:  # no model: the row counts the channels the rule alone keeps
            widths.update(dict.fromkeys(plan.emptied, 0))
        plans.append((ratio, plan.threshold, widths, list(plan.emptied), exists))
    built = [p for p in plans if p[4]]

    surgery = _Surgery(twin, shape, coupling)
    if any(b.needs_selection for b in bns.values()):
        masks = {r: surgery.structure(m, selections) for r, m in masks.items() if r in {p[0] for p in built}}
    costs: dict[float, tuple[int, int]] = {}
    info: dict[str, Any] = {"method": "surgery", "checked_ratios": [], "note": None}
    calc = _CostFormula.build(twin, shape, dense, coupling) if formula else None
    if formula and calc is None:
        info["note"] = "the closed form does not cover this model's structure; every row was built"
    if calc is not None:
        wanted = {check_ratio(r, allow_zero=True) for r in check_ratios}
        checks = {p[0] for p in built if p[0] in wanted}
        if built:
            checks.add(built[-1][0])  # the most pruned model: every layer any row shrinks shrinks here
        ok = True
        for ratio in sorted(checks):
            log(f"checking the closed form by surgery at ratio {ratio:g}")
            if surgery(masks[ratio]) != calc(masks[ratio]):
                ok = False
                break
        if ok:
            info.update(method="formula", checked_ratios=sorted(checks))
            costs = {ratio: calc(masks[ratio]) for ratio, *_ in built}
        else:
            info["note"] = "the closed form disagreed with surgery; every row was built"
    if info["method"] == "surgery":
        for i, (ratio, *_) in enumerate(built, 1):
            log(f"building the slim model for ratio {ratio:g} ({i}/{len(built)})")
            costs[ratio] = surgery(masks[ratio])

    total = sum(b.channels for b in bns.values() if b.prunable)
    rows = []
    for ratio, threshold, widths, emptied, exists in plans:
        params, flops = costs[ratio] if exists else (None, None)
        rows.append(WhatIfRow(
            ratio=ratio, threshold=threshold, channels_kept=sum(widths.values()), channels_total=total,
            params=params, params_kept=_fraction(params, dense.params),
            flops=flops, flops_kept=_fraction(flops, dense.flops), emptied=tuple(emptied),
        ))
    return rows, info


# ----------------------------------------------------------------------------------------------
# the largest safe ratio


def _first_emptying(below: int, total: int) -> float:
    """The smallest float p with int(p·total) >= below: where ``ratio_threshold`` reaches index ``below``."""
    if below <= 0:
        return 0.0
    p = below / total
    while int(p * total) < below:  # the index is computed in floating point, exactly as here
        p = math.nextafter(p, math.inf)
    while int(math.nextafter(p, -math.inf) * total) >= below:
        p = math.nextafter(p, -math.inf)
    return p


def safe_below(scores: Mapping[str, Tensor]) -> tuple[float | None, list[str]]:
    """The bound b with: a ratio 0 < p < 1 empties no layer ⇔ p < b; and the layers emptied first.

    A layer is emptied once the threshold reaches its largest |γ|; the first to go is the
    one whose largest |γ| is smallest. With c of the ``total`` scores below that value, ratio
    p keeps it alive iff ⌊p·total⌋ < c, so b = c/total — here the smallest float p for which
    the index ⌊p·total⌋, computed in floating point as :func:`ratio_threshold` does, reaches
    c (it differs from the division c/total by at most a few ulps). b = 0 when every ratio
    empties a layer; ``(None, [])`` without scores. It does not depend on ``min_channels``
    (which only keeps emptied layers alive).
    """
    # a layer with a channel that can never go (score +inf) is never emptied, and such channels
    # do not count in the total (as in ratio_threshold)
    tops = {name: float(s.max()) for name, s in scores.items() if s.numel() and bool(torch.isfinite(s).all())}
    if not tops:
        return None, []
    weakest = min(tops.values())
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    flat = flat[torch.isfinite(flat)]
    below = int((flat < weakest).sum())
    return _first_emptying(below, flat.numel()), [n for n, t in tops.items() if t == weakest]


__all__ = ["WhatIfRow", "fast_twin", "meta_twin", "ratio_grid", "safe_below", "what_if"]
