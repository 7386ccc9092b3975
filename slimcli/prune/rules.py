"""Which channels to keep: scores, the global threshold, targets, and the checks of their values.

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

:func:`check_ratio`, :func:`check_min_channels` and :func:`check_rule` are the one place
these values are validated: the library's entry points (:func:`compute_keep`,
:func:`slimcli.prune.what_if`, ``inspect_checkpoint``, ``prune_checkpoint``) and the CLI's
option callbacks all call them, so a bad value gets the same :class:`UsageError` message
(``<name> must be <what>, got <value>``) everywhere.
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
#: what each rule's value is, for messages
RULE_VALUES = {
    "ratio": "a fraction of the channels strictly between 0 and 1",
    "threshold": "a |γ| threshold >= 0",
    "target_params": "a fraction of the parameters to keep in (0, 1]",
    "target_flops": "a fraction of the FLOPs to keep in (0, 1]",
}
_RATIO_OR_ZERO = "a fraction of the channels in [0, 1)"

#: ``measure(model, input_shape)`` → an object with ``.params`` and ``.flops``
Measure = Callable[[nn.Module, Sequence[int]], Any]


# ----------------------------------------------------------------------------------------------
# the values of the rules: checked here, for the library and the command line alike


def _bad(name: str, what: str, value: object) -> UsageError:
    shown = repr(value) if isinstance(value, str) else str(value)
    return UsageError(f"{name} must be {what}, got {shown}")


def _float(name: str, what: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _bad(name, what, value) from None


def check_ratio(value: float, *, allow_zero: bool = False) -> float:
    """``value`` as a float in (0, 1) — in [0, 1) with ``allow_zero`` (ratio 0 prunes nothing) —
    else a :class:`UsageError`. ``slim prune``/``slim inspect`` (and their library functions)
    refuse 0; :func:`compute_keep` and :func:`slimcli.prune.what_if` accept it."""
    what = _RATIO_OR_ZERO if allow_zero else RULE_VALUES["ratio"]
    v = _float("ratio", what, value)
    if not ((0 <= v if allow_zero else 0 < v) and v < 1):  # NaN fails both
        raise _bad("ratio", what, value)
    return v


def check_round_to(value: int) -> int:
    """``round_to``: kept channel counts become multiples of this (1: the paper's rule)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise UsageError(f"round_to must be an integer in 1..4096, got {value!r}")
    return value


def check_min_channels(value: int) -> int:
    """``value`` if it is an integer >= 0 (not a bool), else a :class:`UsageError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"min_channels must be an integer >= 0, got {value!r}")
    return value


def check_rule(rule: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a rule and its value (see :data:`RULE_VALUES`) before any work; the value as a float.

    ``ratio`` goes through :func:`check_ratio` (``allow_zero`` is passed on); ``threshold``
    must be finite and >= 0; the targets a fraction in (0, 1].
    """
    if rule not in RULES:
        raise UsageError(f"unknown pruning rule {rule!r}; use one of {', '.join(RULES)}")
    if rule == "ratio":
        return check_ratio(value, allow_zero=allow_zero)
    name, what = rule.replace("_", " "), RULE_VALUES[rule]
    v = _float(name, what, value)
    if not (math.isfinite(v) and (v >= 0 if rule == "threshold" else 0 < v <= 1)):
        raise _bad(name, what, value)
    return v


# ----------------------------------------------------------------------------------------------
# the plan


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
    #: how coupled channels are pruned (see :mod:`slimcli.prune.groups`)
    coupling: str = "auto"
    #: kept counts are multiples of this (or the layer's full width)
    round_to: int = 1
    #: how a coupled group is scored (mean or max |γ| of its members)
    group_score: str = "mean"

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
            "coupling": self.coupling,
            "round_to": self.round_to,
            "group_score": self.group_score,
        }
        if self.achieved is not None:
            out["achieved"] = self.achieved
        return out


def gamma_scores(
    model: nn.Module, bns: Mapping[str, BNInfo], group_score: str | None = "mean"
) -> dict[str, Tensor]:
    """|γ| (float64, CPU) of every prunable BatchNorm in ``bns``; a NaN γ is an error, not a score.

    A channel coupled with channels of other BatchNorms (one class of
    :mod:`slimcli.prune.groups`) scores as its whole group: the mean |γ| of its members
    (``group_score="mean"``, the default, as Torch-Pruning's group reduction; measured to remove
    more parameters at the same ratio on timm models, docs/benchmarks.md) or the largest
    (``"max"``: a group goes only when every member is below the threshold). A channel that can
    never be removed scores +inf. ``None`` gives every channel its own |γ| (the distribution
    ``slim inspect`` draws).
    """
    if group_score not in ("max", "mean", None):
        raise UsageError(f"group_score must be max or mean, got {group_score!r}")
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
    coupled = {n: torch.tensor(bns[n].classes, dtype=torch.long)
               for n in scores if bns[n].classes is not None}
    if not coupled or group_score is None:
        return scores
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    best: dict[int, float] = {}
    for name, classes in coupled.items():
        for c, v in zip(classes.tolist(), scores[name].tolist(), strict=True):
            if c >= 0:
                total[c] = total.get(c, 0.0) + v
                count[c] = count.get(c, 0) + 1
                best[c] = max(best.get(c, 0.0), v)
    for name, classes in coupled.items():
        agg = [math.inf if c < 0 else (best[c] if group_score == "max" else total[c] / count[c])
               for c in classes.tolist()]
        scores[name] = torch.tensor(agg, dtype=torch.float64)
    return scores


def _class_ids(bns: Mapping[str, BNInfo], name: str) -> Tensor | None:
    classes = bns[name].classes if name in bns else None
    return None if classes is None else torch.tensor(classes, dtype=torch.long)


def _kept_classes(masks: Mapping[str, Tensor], bns: Mapping[str, BNInfo]) -> set[int]:
    """The coupled classes some BatchNorm's mask keeps (never the frozen marker -1)."""
    kept: set[int] = set()
    for name, mask in masks.items():
        ids = _class_ids(bns, name)
        if ids is not None:
            kept.update(ids[mask].tolist())
    kept.discard(-1)
    return kept


def _class_scores(scores: Mapping[str, Tensor], bns: Mapping[str, BNInfo]) -> dict[int, float]:
    """Class → its score (coupled scores are equal across members; the largest is taken)."""
    best: dict[int, float] = {}
    for name, s in scores.items():
        ids = _class_ids(bns, name)
        if ids is not None:
            for k, v in zip(ids.tolist(), s.tolist(), strict=True):
                best[k] = max(best.get(k, -math.inf), v)
    return best


def _keep_classes(
    masks: Mapping[str, Tensor], bns: Mapping[str, BNInfo], classes: set[int]
) -> dict[str, Tensor]:
    """``masks`` with every channel of ``classes`` kept, in every BatchNorm that has it."""
    if not classes:
        return dict(masks)
    wanted = torch.tensor(sorted(classes), dtype=torch.long)
    out = {}
    for name, mask in masks.items():
        ids = _class_ids(bns, name)
        out[name] = mask if ids is None else mask | torch.isin(ids, wanted)
    return out


def couple_masks(masks: dict[str, Tensor], bns: Mapping[str, BNInfo]) -> dict[str, Tensor]:
    """Keep a coupled channel everywhere when any of its BatchNorms keeps it (``min_channels``)."""
    return _keep_classes(masks, bns, _kept_classes(masks, bns))


def ratio_threshold(scores: Mapping[str, Tensor], ratio: float) -> float | None:
    """The paper's global threshold: sorted |γ| at index ⌊ratio·total⌋ (None for ratio 0)."""
    ratio = check_ratio(ratio, allow_zero=True)
    if ratio == 0 or not scores:
        return None
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    flat = torch.sort(flat[torch.isfinite(flat)]).values  # channels that can never go do not count
    if not flat.numel():
        return None
    # int(p·total) in floating point, exactly as the reference code (and any re-implementation
    # of ⌊p·total⌋) computes it, so thresholds agree bit for bit: the float 0.29 is a little
    # below 0.29, and 0.29·100 gives index 28.
    index = int(float(ratio) * flat.numel())
    return float(flat[min(index, flat.numel() - 1)])


def _keep(
    scores: Mapping[str, Tensor], threshold: float | None, min_channels: int,
    bns: Mapping[str, BNInfo] | None = None, round_to: int = 1,
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
    keep_one = getattr(bns, "keep_one", None)
    if bns is not None and keep_one and min_channels >= 1:
        masks = _keep_every_tensor(masks, scores, bns, keep_one)
    elif bns is not None and bit:
        masks = couple_masks(masks, bns)
    if round_to > 1:
        masks = round_up(masks, scores, bns or {}, round_to)
    return masks, bit, emptied


def round_up(masks: dict[str, Tensor], scores: Mapping[str, Tensor], bns: Mapping[str, BNInfo],
             n: int) -> dict[str, Tensor]:
    """``--round-to n`` on ``masks``: every kept count a multiple of ``n`` (or the layer's width),
    adding back the largest-score channels; per conv-created tensor where the analysis has units."""
    units = getattr(bns, "units", None)
    if units:
        return _round_units(masks, scores, bns, units, n)
    return round_masks(masks, scores, bns, n)


def _round_units(masks: dict[str, Tensor], scores: Mapping[str, Tensor], bns: Mapping[str, BNInfo],
                 units: Sequence[tuple[int, ...]], n: int) -> dict[str, Tensor]:
    """--round-to on coupled graphs: the kept classes of every tensor a conv (or selection) creates
    become a multiple of ``n`` (adding back its strongest classes), so every conv has round counts on
    both sides and a BatchNorm after a concatenation sums round pieces; BatchNorms without class ids
    are rounded one by one."""
    best = _class_scores(scores, bns)
    kept = _kept_classes(masks, bns)
    for _ in range(64):
        changed = False
        for unit in units:
            have = [c for c in unit if c in kept]
            target = min(-(-len(have) // n) * n, len(unit)) if have else 0
            if target > len(have):
                missing = sorted((c for c in unit if c not in kept),
                                 key=lambda c: (-best.get(c, -math.inf), c))
                kept.update(missing[: target - len(have)])
                changed = True
        if not changed:
            break
    out = _keep_classes(masks, bns, kept)
    plain = {k: v for k, v in out.items() if bns[k].classes is None}
    if plain:
        out.update(round_masks(plain, scores, bns, n))
    return out


def round_masks(masks: dict[str, Tensor], scores: Mapping[str, Tensor], bns: Mapping[str, BNInfo],
                n: int) -> dict[str, Tensor]:
    """Round every kept count up to a multiple of ``n`` (or the layer's width), adding back the
    largest-score channels; coupled channels come back everywhere at once, until every count fits.

    Rounding up only ever keeps more, so it converges; a layer narrower than ``n`` stays whole.
    """
    masks = {k: v.clone() for k, v in masks.items()}
    for _ in range(64):
        changed = False
        for name, mask in masks.items():
            kept, total = int(mask.sum()), mask.numel()
            target = min(-(-kept // n) * n, total) if kept else 0
            if target > kept:
                free = torch.where(mask, -math.inf, scores[name])
                order = torch.argsort(free, descending=True, stable=True)
                mask[order[: target - kept]] = True
                changed = True
        if not changed:
            return masks
        if any(b.classes is not None for b in bns.values()):
            masks = couple_masks(masks, bns)
    return masks


def _keep_every_tensor(masks: dict[str, Tensor], scores: Mapping[str, Tensor], bns: Mapping[str, BNInfo],
                       keep_one: Sequence[tuple[int, ...]]) -> dict[str, Tensor]:
    """Give back the strongest coupled class of every tensor the masks would empty, then couple."""
    masks = couple_masks(masks, bns)
    kept = _kept_classes(masks, bns)
    best = _class_scores(scores, bns)
    extra: set[int] = set()
    for group in keep_one:
        if not kept.intersection(group) and not extra.intersection(group):
            extra.add(max(group, key=lambda k: (best.get(k, -math.inf), -k)))
    return _keep_classes(masks, bns, extra)


def _emptied_error(emptied: Sequence[str], what: str) -> PruneError:
    return PruneError(
        f"{what} removes every channel of {', '.join(emptied)}; use min_channels >= 1 (--min-channels 1) "
        f"to keep the strongest channel(s) of each layer, or prune less"
    )


def compute_keep(
    model: nn.Module,
    rule: str,
    value: float,
    min_channels: int = 1,
    *,
    input_shape: Sequence[int] | None = None,
    bns: Mapping[str, BNInfo] | None = None,
    measure: Measure | None = None,
    coupling: str = "auto",
    group_score: str = "mean",
    round_to: int = 1,
) -> KeepPlan:
    """Keep masks for every prunable BatchNorm under ``rule`` (see the module docstring).

    ``bns`` (from :func:`prunable_bns`) saves a second trace; ``input_shape`` defaults to
    the model's attribute. ``measure`` replaces :func:`slimcli.measure.measure` in the
    target searches. ``coupling`` (``auto``, ``joint``, ``select``) says how coupled channels
    are pruned (``bns`` must come from the same coupling) and ``group_score`` how a coupled
    group is scored (:func:`gamma_scores`).
    """
    value = check_rule(rule, value, allow_zero=True)
    check_min_channels(min_channels)
    check_round_to(round_to)
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    if bns is None:
        bns = analyze(model, shape, coupling=coupling).bns
    scores = gamma_scores(model, bns, group_score)
    if not scores:
        why = "; ".join(f"{n}: {b.reason}" for n, b in bns.items()) or "it has no BatchNorm at all"
        raise PruneError(f"{type(model).__name__} has nothing to prune ({why})")
    if rule in ("target_params", "target_flops"):
        plan = _search_target(model, rule, value, min_channels, scores, shape, measure, bns, coupling,
                              round_to)
        plan.coupling, plan.round_to, plan.group_score = coupling, round_to, group_score
        return plan
    if rule == "ratio":
        threshold = ratio_threshold(scores, value)
        what = f"ratio {value:g}"
    else:
        threshold, what = value, f"threshold {value:g}"
    masks, bit, emptied = _keep(scores, threshold, min_channels, bns, round_to)
    if emptied and min_channels == 0:
        raise _emptied_error(emptied, what)
    return KeepPlan(rule, value, threshold, masks, min_channels, bit, emptied,
                    tuple(shape) if shape is not None else None, coupling=coupling, round_to=round_to,
                    group_score=group_score)


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
    bns: Mapping[str, BNInfo],
    coupling: str,
    round_to: int = 1,
) -> KeepPlan:
    metric = _metric(rule, measure or _measure, shape)
    analysis = analyze(copy.deepcopy(model), shape, coupling=coupling)
    dense = metric(model)
    budget = fraction * dense
    candidates = torch.unique(torch.cat([s.reshape(-1) for s in scores.values()]))  # sorted
    candidates = candidates[torch.isfinite(candidates)]
    last = candidates.numel() - 1
    if min_channels == 0:  # thresholds at or above a layer's largest |γ| would empty it
        smallest_max = min(float(s.max()) for s in scores.values())
        last = int((candidates < smallest_max).sum()) - 1
    cache: dict[int, tuple[float, tuple[dict[str, Tensor], dict[str, tuple[int, int]], list[str]]]] = {}

    def kept_at(i: int) -> float:  # i = -1: keep everything; else keep |γ| > candidates[i]
        if i not in cache:
            keep = _keep(scores, None if i < 0 else float(candidates[i]), min_channels, bns, round_to)
            widths = {n: int(m.sum()) for n, m in keep[0].items()}
            cache[i] = (metric(rebuild(analysis.clone(), widths, keep=keep[0])), keep)
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
