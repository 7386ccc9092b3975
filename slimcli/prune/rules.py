"""Which channels to keep: scores, the global threshold, targets, and the what-if table.

Scores are |γ| of every prunable BatchNorm, pooled over the whole network (the paper's
global threshold). The rules:

- ``ratio`` p: sort all scores ascending, threshold = the value at index ⌊p·total⌋, keep
  |γ| > threshold (ties at the threshold go, so slightly more than p can be pruned);
  p = 0 keeps everything;
- ``threshold`` T: keep |γ| > T (T = 0 keeps exactly the nonzeros of a proximal run);
- ``target_params`` / ``target_flops`` F: the lowest threshold whose *rebuilt* slim model
  keeps at most the fraction F of the dense model's parameters / FLOPs, i.e. the largest
  model within budget, found by bisection over the sorted distinct scores.

``min_channels`` N then gives back, in every layer that kept fewer, its N largest-|γ|
channels; the plan records where that happened. With N = 0 a rule that empties a layer is
an error naming the layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from slimcli.errors import PruneError, UsageError
from slimcli.measure import measure as _measure
from slimcli.prune.graph import BNInfo, analyze
from slimcli.prune.surgery import rebuild

RULES = ("ratio", "threshold", "target_params", "target_flops")

#: ``measure(model, input_shape)`` → an object with ``.params`` and ``.flops``
Measure = Callable[[nn.Module, Sequence[int]], Any]


@dataclass
class KeepPlan:
    """Per-BatchNorm keep masks chosen by one rule, and what happened on the way."""

    rule: str
    value: float
    threshold: float | None  # keep |γ| > threshold; None: nothing pruned by the rule
    masks: dict[str, Tensor]  # prunable BN name → bool mask (True = keep)
    min_channels: int
    #: BN name → (channels the rule kept, channels kept) where min_channels raised the count
    min_channels_bit: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: BatchNorms the rule alone would empty (min_channels then kept some)
    emptied: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    #: for target rules: the kept fraction of params / FLOPs that was reached
    achieved: float | None = None

    @property
    def widths(self) -> dict[str, int]:
        """Prunable BN name → kept channels (the checkpoint's ``slim.widths``)."""
        return {name: int(m.sum()) for name, m in self.masks.items()}

    @property
    def total_channels(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def kept_channels(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def ratio(self) -> float:
        """Fraction of the prunable channels removed."""
        total = self.total_channels
        return 1.0 - self.kept_channels / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (for the checkpoint's ``slim.prune`` and ``--json``)."""
        out: dict[str, Any] = {
            "rule": self.rule,
            "value": self.value,
            "threshold": self.threshold,
            "min_channels": self.min_channels,
            "channels_total": self.total_channels,
            "channels_kept": self.kept_channels,
            "channels_pruned_ratio": self.ratio,
            "min_channels_bit": {k: list(v) for k, v in self.min_channels_bit.items()},
            "emptied_by_rule": list(self.emptied),
        }
        if self.achieved is not None:
            out["achieved"] = self.achieved
        return out


def gamma_scores(model: nn.Module, bns: Mapping[str, BNInfo]) -> dict[str, Tensor]:
    """|γ| (float64, CPU) of every prunable BatchNorm in ``bns``; a NaN γ is an error, not a score."""
    scores = {
        name: model.get_submodule(name).weight.detach().abs().to("cpu", torch.float64)
        for name, info in bns.items()
        if info.prunable
    }
    broken = [name for name, s in scores.items() if torch.isnan(s).any()]
    if broken:
        raise PruneError(
            f"BatchNorm scales of {', '.join(broken)} are NaN (did training diverge?); "
            f"prune an earlier checkpoint, e.g. best.safetensors of the run"
        )
    return scores


def ratio_threshold(scores: Mapping[str, Tensor], ratio: float) -> float | None:
    """The paper's global threshold: sorted |γ| at index ⌊ratio·total⌋ (None for ratio 0)."""
    if not 0 <= ratio < 1:
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    if ratio == 0 or not scores:
        return None
    flat = torch.sort(torch.cat([s.reshape(-1) for s in scores.values()])).values
    # int(p·total) in floating point, exactly as the reference code (and any re-implementation
    # of ⌊p·total⌋) computes it, so thresholds agree bit for bit: the float 0.29 is a little
    # below 0.29, and 0.29·100 gives index 28.
    index = int(float(ratio) * flat.numel())
    return float(flat[min(index, flat.numel() - 1)])


def _keep(
    scores: Mapping[str, Tensor], threshold: float | None, min_channels: int
) -> tuple[dict[str, Tensor], dict[str, tuple[int, int]], list[str]]:
    masks: dict[str, Tensor] = {}
    bit: dict[str, tuple[int, int]] = {}
    emptied: list[str] = []
    for name, s in scores.items():
        mask = s > threshold if threshold is not None else torch.ones_like(s, dtype=torch.bool)
        by_rule = int(mask.sum())
        if by_rule == 0:
            emptied.append(name)
        need = min(min_channels, s.numel())
        if by_rule < need:
            mask = mask.clone()
            mask[torch.argsort(s, descending=True, stable=True)[:need]] = True
            bit[name] = (by_rule, need)
        masks[name] = mask
    return masks, bit, emptied


def _emptied_error(emptied: Sequence[str], what: str) -> PruneError:
    return PruneError(
        f"{what} removes every channel of {', '.join(emptied)}; use min_channels >= 1 (--min-channels 1) "
        f"to keep the strongest channel(s) of each layer, or prune less"
    )


def _check_min_channels(min_channels: int) -> None:
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 0:
        raise UsageError(f"min_channels must be an integer >= 0, got {min_channels!r}")


def compute_keep(
    model: nn.Module,
    rule: str,
    value: float,
    min_channels: int = 1,
    *,
    input_shape: Sequence[int] | None = None,
    bns: Mapping[str, BNInfo] | None = None,
    measure: Measure | None = None,
) -> KeepPlan:
    """Keep masks for every prunable BatchNorm under ``rule`` (see the module docstring).

    ``bns`` (from :func:`prunable_bns`) saves a second trace; ``input_shape`` defaults to
    the model's attribute. ``measure`` replaces :func:`slimcli.measure.measure` in the
    target searches.
    """
    _check_min_channels(min_channels)
    if rule not in RULES:
        raise UsageError(f"unknown pruning rule '{rule}'; use one of {', '.join(RULES)}")
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    if bns is None:
        bns = analyze(model, shape).bns
    scores = gamma_scores(model, bns)
    if not scores:
        why = "; ".join(f"{n}: {b.reason}" for n, b in bns.items()) or "it has no BatchNorm at all"
        raise PruneError(f"{type(model).__name__} has nothing to prune ({why})")
    value = float(value)
    if rule in ("target_params", "target_flops"):
        return _search_target(model, rule, value, min_channels, scores, shape, measure)
    if rule == "ratio":
        threshold = ratio_threshold(scores, value)
        what = f"ratio {value:g}"
    else:
        if not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"threshold must be a finite number >= 0, got {value}")
        threshold, what = value, f"threshold {value:g}"
    masks, bit, emptied = _keep(scores, threshold, min_channels)
    if emptied and min_channels == 0:
        raise _emptied_error(emptied, what)
    return KeepPlan(rule, value, threshold, masks, min_channels, bit, emptied,
                    tuple(shape) if shape is not None else None)


def _metric(rule: str, measure: Measure, shape: Sequence[int] | None) -> Callable[[nn.Module], float]:
    attr = "params" if rule == "target_params" else "flops"
    return lambda m: float(getattr(measure(m, shape), attr))


def _search_target(
    model: nn.Module,
    rule: str,
    fraction: float,
    min_channels: int,
    scores: Mapping[str, Tensor],
    shape: Sequence[int] | None,
    measure: Measure | None,
) -> KeepPlan:
    if not 0 < fraction <= 1:
        what = rule.replace("_", " ")
        raise UsageError(f"{what} must be a fraction in (0, 1] of the dense model, got {fraction}")
    metric = _metric(rule, measure or _measure, shape)
    analysis = analyze(copy.deepcopy(model), shape)
    dense = metric(model)
    budget = fraction * dense
    candidates = torch.unique(torch.cat([s.reshape(-1) for s in scores.values()]))  # sorted
    last = candidates.numel() - 1
    if min_channels == 0:  # thresholds at or above a layer's largest |γ| would empty it
        smallest_max = min(float(s.max()) for s in scores.values())
        last = int((candidates < smallest_max).sum()) - 1
    cache: dict[int, tuple[float, tuple[dict[str, Tensor], dict[str, tuple[int, int]], list[str]]]] = {}

    def kept_at(i: int) -> float:  # i = -1: keep everything; else keep |γ| > candidates[i]
        if i not in cache:
            keep = _keep(scores, None if i < 0 else float(candidates[i]), min_channels)
            widths = {n: int(m.sum()) for n, m in keep[0].items()}
            cache[i] = (metric(rebuild(analysis.clone(), widths)), keep)
        return cache[i][0]

    if kept_at(last) > budget:
        smallest = kept_at(last) / dense if dense else 0.0
        raise PruneError(
            f"cannot keep only {fraction:g} of the {'parameters' if rule == 'target_params' else 'FLOPs'}: "
            f"the smallest model the rule can build (--min-channels {min_channels}) keeps {smallest:.4f}; "
            f"ask for a larger fraction"
        )
    lo, hi = -1, last  # invariant: kept_at(hi) <= budget; the answer is the smallest such index
    if kept_at(lo) <= budget:
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kept_at(mid) <= budget:
            hi = mid
        else:
            lo = mid
    value, (masks, bit, emptied) = cache[hi]
    threshold = None if hi < 0 else float(candidates[hi])
    return KeepPlan(rule, fraction, threshold, masks, min_channels, bit, emptied,
                    tuple(shape) if shape is not None else None, achieved=value / dense if dense else 1.0)


# ----------------------------------------------------------------------------------------------
# the what-if table of `slim inspect`


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


def _fraction(part: int | None, whole: float) -> float | None:
    if part is None:
        return None
    return part / whole if whole else 1.0


def ratio_grid(step: float = 0.05) -> list[float]:
    """0.05, 0.10, …, 0.95 (for ``step`` 0.05): the paper's sweep."""
    if not 0 < step < 1:
        raise UsageError(f"step must be in (0, 1), got {step}")
    n = math.ceil(round(1 / step, 9)) - 1
    return [round(k * step, 10) for k in range(1, n + 1)]


def what_if(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    ratios: Sequence[float] | None = None,
    *,
    min_channels: int = 1,
    measure: Measure | None = None,
) -> list[WhatIfRow]:
    """One row per ratio (default :func:`ratio_grid`): the slim model ``--ratio`` would build.

    Params and FLOPs are measured on the rebuilt slim model (with ``min_channels``, default
    1, as ``slim prune`` uses); ``emptied`` lists the layers the ratio alone would empty.
    """
    _check_min_channels(min_channels)
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    analysis = analyze(copy.deepcopy(model), shape)
    scores = gamma_scores(model, analysis.bns)
    measure = measure or _measure
    dense = measure(model, shape)
    rows = []
    for ratio in ratios if ratios is not None else ratio_grid():
        threshold = ratio_threshold(scores, ratio)
        masks, _, emptied = _keep(scores, threshold, min_channels)
        widths = {n: int(m.sum()) for n, m in masks.items()}
        params = flops = None
        if not (emptied and min_channels == 0):  # else no model exists: the row reports the emptied layers
            slim = measure(rebuild(analysis.clone(), widths), shape)
            params, flops = int(slim.params), int(slim.flops)
        rows.append(WhatIfRow(
            ratio=float(ratio), threshold=threshold, channels_kept=sum(widths.values()),
            channels_total=sum(m.numel() for m in masks.values()), params=params,
            params_kept=_fraction(params, dense.params), flops=flops,
            flops_kept=_fraction(flops, dense.flops), emptied=tuple(emptied),
        ))
    return rows


def max_safe_ratio(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    step: float = 0.05,
    *,
    bns: Mapping[str, BNInfo] | None = None,
) -> float:
    """The largest ratio of the ``step`` grid that empties no layer (with min_channels 0); 0.0 if none."""
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    if bns is None:
        bns = analyze(model, shape).bns
    scores = gamma_scores(model, bns)
    best = 0.0
    for ratio in ratio_grid(step):
        if _keep(scores, ratio_threshold(scores, ratio), 0)[2]:
            break  # the threshold only grows with the ratio: every larger ratio empties too
        best = ratio
    return best
