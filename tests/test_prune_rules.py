"""Keep rules: the paper's global threshold, min_channels, targets found by search, what-if."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from _prune_toys import TOYS, randomize
from torch import nn

from slimcli.errors import PruneError, UsageError
from slimcli.measure import count_params, measure
from slimcli.prune import (
    analyze,
    check_min_channels,
    check_ratio,
    check_rule,
    compute_keep,
    gamma_scores,
    prunable_bns,
    prune_model,
    ratio_grid,
    ratio_threshold,
    safe_below,
    what_if,
)
from slimcli.prune.surgery import rebuild

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_shape(name: str = "preact", seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    ctor, shape = TOYS[name]
    return randomize(ctor(), seed).eval(), shape


def all_scores(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat(list(gamma_scores(model, prunable_bns(model, shape)).values()))


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.3, 0.5, 0.55, 0.7, 0.95])
def test_ratio_threshold_is_the_papers_percentile(ratio: float) -> None:
    model, shape = model_and_shape()
    plan = compute_keep(model, "ratio", ratio, input_shape=shape)
    flat = all_scores(model, shape)
    ordered = sorted(flat.tolist())
    assert plan.threshold == ordered[round(ratio * 100) * len(ordered) // 100]
    for name, mask in plan.masks.items():
        g = model.get_submodule(name).weight.detach().abs()
        expected = g > plan.threshold
        if name in plan.min_channels_bit:
            assert int(expected.sum()) == plan.min_channels_bit[name][0] == 0 and int(mask.sum()) == 1
            assert mask[g.argmax()]
        else:
            assert torch.equal(mask, expected)


def test_ratio_index_is_computed_like_the_reference_code() -> None:
    # the reference code's int(total * percent): 0.29 * 100 is 28.999999999999996, index 28, so
    # the threshold is the 29th smallest |γ| and (keeping |γ| > threshold) 29 channels go
    model = nn.Sequential(nn.Conv2d(1, 100, 1, bias=False), nn.BatchNorm2d(100), nn.ReLU(),
                          nn.Conv2d(100, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.randperm(100).double() + 1)
    plan = compute_keep(model, "ratio", 0.29, input_shape=(1, 2, 2))
    assert plan.threshold == 29.0 and plan.kept_channels == 71
    assert compute_keep(model, "ratio", 0.3, input_shape=(1, 2, 2)).kept_channels == 69


def test_ratio_zero_keeps_everything_and_ties_are_pruned() -> None:
    model, shape = model_and_shape("vgg_global")
    assert compute_keep(model, "ratio", 0.0, input_shape=shape).ratio == 0
    with torch.no_grad():
        for name in ("features.1", "features.5", "features.9"):
            model.get_submodule(name).weight.fill_(0.5)
        model.get_submodule("features.1").weight[0] = 0.9
    # everything ties at 0.5 = the threshold: only the one strictly larger channel survives
    # the message names both the library argument and the CLI option that fix it
    with pytest.raises(PruneError, match=r"features\.5, features\.9; .*\(--min-channels 1\)"):
        compute_keep(model, "ratio", 0.1, input_shape=shape, min_channels=0)
    plan = compute_keep(model, "ratio", 0.1, input_shape=shape)
    assert plan.threshold == 0.5 and plan.emptied == ["features.5", "features.9"]
    assert plan.widths == {"features.1": 1, "features.5": 1, "features.9": 1}
    assert plan.masks["features.1"][0]


def test_negative_gammas_use_magnitudes() -> None:
    model, shape = model_and_shape("vgg_global")
    with torch.no_grad():
        model.features[1].weight.neg_()
    plan = compute_keep(model, "ratio", 0.5, input_shape=shape)
    flipped = randomize(TOYS["vgg_global"][0]()).eval()
    assert plan.widths == compute_keep(flipped, "ratio", 0.5, input_shape=shape).widths


def test_threshold_zero_keeps_the_nonzeros_of_a_proximal_run() -> None:
    model, shape = model_and_shape("dense")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[torch.rand(m.num_features, generator=g) < 0.4] = 0.0
                m.weight[0] = 0.1  # every layer keeps something
    plan = compute_keep(model, "threshold", 0.0, input_shape=shape, min_channels=0)
    for name, mask in plan.masks.items():
        assert torch.equal(mask, model.get_submodule(name).weight.detach() != 0)
    plan = compute_keep(model, "threshold", 0.25, input_shape=shape)
    for name, mask in plan.masks.items():
        w = model.get_submodule(name).weight.detach().abs()
        assert torch.equal(mask, w > 0.25) or name in plan.min_channels_bit


def emptying_model() -> tuple[nn.Module, tuple[int, ...]]:
    """A VGG chain whose middle layer has only tiny |γ|: any real ratio empties it."""
    model, shape = model_and_shape("vgg_global")
    with torch.no_grad():
        model.features[5].weight.copy_(torch.linspace(1e-4, 2e-4, 12))
        model.features[5].weight[7] = 3e-4
        model.features[5].weight[2] = 2.5e-4
    return model, shape


def test_min_channels_keeps_the_strongest_channels_and_reports_it() -> None:
    model, shape = emptying_model()
    for n in (1, 2, 3):
        plan = compute_keep(model, "ratio", 0.5, n, input_shape=shape)
        assert plan.emptied == ["features.5"]
        assert plan.min_channels_bit["features.5"] == (0, n)
        kept = plan.masks["features.5"].nonzero().flatten().tolist()
        assert kept == sorted([7, 2, 11][:n])  # the n largest |γ|
    with pytest.raises(PruneError, match=r"features\.5"):
        compute_keep(model, "ratio", 0.5, 0, input_shape=shape)
    _slim, report = prune_model(model, compute_keep(model, "ratio", 0.5, input_shape=shape))
    assert report.widths["features.5"] == 1
    assert report.min_channels_bit == {"features.5": (0, 1)}
    assert report.as_dict()["min_channels_bit"] == {"features.5": [0, 1]}


def test_min_channels_larger_than_a_layer_keeps_the_whole_layer() -> None:
    model, shape = model_and_shape("input_bn")  # bn0 has 3 channels
    plan = compute_keep(model, "ratio", 0.9, 5, input_shape=shape)
    assert plan.widths == {"bn0": 3, "bn": 5}


def brute_force_target(model: nn.Module, shape: tuple[int, ...], metric, fraction: float,
                       min_channels: int) -> dict[str, int] | None:
    """Try every distinct threshold; the largest model within budget (ties: lowest threshold)."""
    analysis = analyze(copy.deepcopy(model), shape)
    scores = gamma_scores(model, analysis.bns)
    dense = metric(model)
    best = None
    for t in [-math.inf, *sorted(set(torch.cat(list(scores.values())).tolist()))]:
        widths = {}
        for name, s in scores.items():
            k = int((s > t).sum())
            if k == 0 and min_channels == 0:
                return best
            widths[name] = max(k, min(min_channels, s.numel()))
        value = metric(rebuild(analysis.clone(), widths))
        if value <= fraction * dense:
            return widths
    return best


@pytest.mark.parametrize(("name", "fraction"), [("vgg_global", 0.5), ("preact", 0.8), ("dense", 0.6)])
def test_target_params_matches_brute_force(name: str, fraction: float) -> None:
    model, shape = model_and_shape(name)
    plan = compute_keep(model, "target_params", fraction, input_shape=shape)
    expected = brute_force_target(model, shape, count_params, fraction, 1)
    assert plan.widths == expected
    _slim, report = prune_model(model, plan)
    assert report.params_after <= fraction * report.params_before
    assert plan.achieved == pytest.approx(report.params_after / report.params_before)


def test_target_flops_matches_brute_force_and_uses_the_measure_given() -> None:
    model, shape = model_and_shape("vgg_global")
    calls = []

    def spy(m: nn.Module, s):
        calls.append(1)
        return measure(m, s)

    plan = compute_keep(model, "target_flops", 0.4, input_shape=shape, measure=spy)
    assert calls
    expected = brute_force_target(model, shape, lambda m: measure(m, shape).flops, 0.4, 1)
    assert plan.widths == expected and plan.achieved <= 0.4
    assert len(calls) < 2 + 2 * math.ceil(math.log2(30))  # bisection, not a sweep


def test_target_with_min_channels_zero_never_empties_a_layer() -> None:
    model, shape = emptying_model()
    plan = compute_keep(model, "target_params", 0.9, 0, input_shape=shape)
    assert all(int(m.sum()) > 0 for m in plan.masks.values())
    assert plan.widths == brute_force_target(model, shape, count_params, 0.9, 0)
    with pytest.raises(PruneError, match="cannot keep only"):
        compute_keep(model, "target_params", 0.05, 0, input_shape=shape)
    assert compute_keep(model, "target_params", 1.0, input_shape=shape).ratio == 0


@pytest.mark.parametrize("formula", [True, False])
def test_what_if_rows_match_real_pruning(formula: bool) -> None:
    model, shape = emptying_model()
    rows, info = what_if(model, shape, formula=formula)
    assert info["method"] == ("formula" if formula else "surgery")
    assert [r.ratio for r in rows] == ratio_grid() and len(rows) == 19
    dense = count_params(model)
    for row in rows[::6]:
        plan = compute_keep(model, "ratio", row.ratio, input_shape=shape)
        slim, report = prune_model(model, plan)
        assert row.threshold == plan.threshold and row.channels_kept == plan.kept_channels
        assert row.params == report.params_after and row.params_kept == pytest.approx(row.params / dense)
        assert row.flops == measure(slim, shape).flops
        assert list(row.emptied) == plan.emptied
    for a, b in itertools.pairwise(rows):
        assert a.channels_kept >= b.channels_kept and a.params >= b.params
    assert rows[-1].emptied and rows[-1].as_dict()["emptied"] == list(rows[-1].emptied)
    strict, _ = what_if(model, shape, [0.05, 0.9], min_channels=0, formula=formula)
    assert strict[1].params is None and strict[1].emptied


def test_what_if_formula_equals_surgery_on_toy_graphs() -> None:
    for name in ("vgg_global", "preact", "dense"):
        model, shape = model_and_shape(name)
        for min_channels in (0, 1):
            fast, info = what_if(model, shape, min_channels=min_channels)
            built, built_info = what_if(model, shape, min_channels=min_channels, formula=False)
            assert (info["method"], built_info["method"]) == ("formula", "surgery")
            assert [r.as_dict() for r in fast] == [r.as_dict() for r in built]


def _empties_a_layer(model: nn.Module, shape: tuple[int, ...], bns: dict, ratio: float) -> bool:
    try:
        compute_keep(model, "ratio", ratio, 0, input_shape=shape, bns=bns)
    except PruneError:
        return True
    return False


def test_safe_below_decides_every_grid_ratio() -> None:
    """The largest safe ratio of the grid is the last one below the bound (what the demo uses)."""
    models = [model_and_shape(name) for name in ("vgg_global", "preact", "dense")] + [emptying_model()]
    found = []
    for model, shape in models:
        safe = []
        bns = prunable_bns(model, shape)
        for r in ratio_grid():
            if _empties_a_layer(model, shape, bns, r):
                break
            safe.append(r)
        bound, first = safe_below(gamma_scores(model, bns))
        for r in ratio_grid():  # one number, right for every ratio of the grid
            assert (r < bound) == (not _empties_a_layer(model, shape, bns, r)), r
        found.append(max((r for r in ratio_grid() if r < bound), default=0.0))
        assert found[-1] == (safe[-1] if safe else 0.0)
        emptied = compute_keep(model, "ratio", max(bound, 1e-9), 1, input_shape=shape, bns=bns).emptied
        assert emptied and set(first) <= set(emptied)  # at the bound, the named layer goes first
    # 12 of the 30 channels are tiny and in one layer: ratio 0.4 (index 12) empties it; exactly, the
    # index reaches its largest |γ| (11 scores below it) from ratio 11/30 on
    assert found[-1] == 0.35 and bound == pytest.approx(11 / 30) and first == ["features.5"]


def test_safe_below_is_exact_to_the_last_float() -> None:
    """p < bound ⇔ ratio p empties no layer, also for the floats next to the bound."""
    n = 100
    for c in (1, 7, 28, 29, 30, 57, 99):  # 0.29·100 = 28.999…: the float index needs care
        weak = torch.arange(1, c + 2, dtype=torch.float64)  # its largest |γ| has c scores below it
        scores = {"weak": weak, "strong": torch.full((n - c - 1,), 1e3, dtype=torch.float64)}
        bound, first = safe_below(scores)
        assert first == ["weak"] and bound == pytest.approx(c / n, abs=1e-15)
        below = math.nextafter(bound, 0.0)
        for p in (below, math.nextafter(below, 0.0), bound, math.nextafter(bound, 1.0)):
            threshold = ratio_threshold(scores, p)
            assert (p < bound) == (threshold < float(weak.max())), (c, p)
    assert safe_below({}) == (None, [])
    zeros = {"dead": torch.zeros(3, dtype=torch.float64), "alive": torch.ones(5, dtype=torch.float64)}
    assert safe_below(zeros) == (0.0, ["dead"])  # every ratio > 0 empties the dead layer


def test_bad_requests_are_usage_errors() -> None:
    model, shape = model_and_shape("vgg_global")
    for rule, value in (("ratio", 1.0), ("ratio", -0.1), ("threshold", -1.0), ("threshold", math.nan),
                        ("target_params", 0.0), ("target_flops", 1.5), ("percent", 0.5)):
        with pytest.raises(UsageError):
            compute_keep(model, rule, value, input_shape=shape)
    with pytest.raises(UsageError, match="min_channels"):
        compute_keep(model, "ratio", 0.5, -1, input_shape=shape)
    with pytest.raises(UsageError, match=r"ratio must be a fraction of the channels in \[0, 1\), got 1\.0"):
        what_if(model, shape, [0.5, 1.0])
    with pytest.raises(UsageError, match="min_channels must be an integer >= 0, got True"):
        what_if(model, shape, min_channels=True)


def test_one_validator_and_one_message_format() -> None:
    """``<name> must be <what>, got <value>``: the library and the CLI callbacks share these."""
    assert check_ratio(0.5) == 0.5 and check_ratio("0.25") == 0.25 and check_ratio(0, allow_zero=True) == 0
    for bad in (0, 0.0, 1, 1.5, -0.1, math.nan, math.inf):
        with pytest.raises(UsageError, match=r"^ratio must be a fraction of the channels strictly between 0 "
                                             r"and 1, got "):
            check_ratio(bad)
    for bad in (1, -0.1, math.nan):
        with pytest.raises(UsageError, match=r"^ratio must be a fraction of the channels in \[0, 1\), got "):
            check_ratio(bad, allow_zero=True)
    with pytest.raises(UsageError, match=r"^ratio must be .*, got 'half'$"):
        check_ratio("half")
    assert check_min_channels(0) == 0 and check_min_channels(3) == 3
    for bad in (-1, 1.0, True, "2", None):
        with pytest.raises(UsageError) as info:
            check_min_channels(bad)
        assert str(info.value) == f"min_channels must be an integer >= 0, got {bad!r}"
    assert check_rule("threshold", 0) == 0.0 and check_rule("target_flops", 1) == 1.0
    for rule, value, what in (("threshold", -1.0, r"a \|γ\| threshold >= 0"),
                              ("threshold", math.inf, r"a \|γ\| threshold >= 0"),
                              ("target_params", 0, r"a fraction of the parameters to keep in \(0, 1\]"),
                              ("target_flops", 1.5, r"a fraction of the FLOPs to keep in \(0, 1\]"),
                              ("ratio", 0.0, "a fraction of the channels strictly between 0 and 1")):
        with pytest.raises(UsageError, match=rf"^{rule.replace('_', ' ')} must be {what}, got "):
            check_rule(rule, value)
    assert check_rule("ratio", 0.0, allow_zero=True) == 0.0
    with pytest.raises(UsageError, match="unknown pruning rule 'percent'; use one of ratio, threshold"):
        check_rule("percent", 0.5)


def test_model_without_prunable_bns_is_a_prune_error() -> None:
    model, shape = model_and_shape("awkward")
    only_bad = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(PruneError, match="model output"):
        compute_keep(only_bad, "ratio", 0.5, input_shape=(3, 2, 2))
    assert set(compute_keep(model, "ratio", 0.5, input_shape=shape).masks) == {"bn_grp", "bn_dw"}


def test_nan_gamma_is_an_error_naming_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].weight[2] = float("nan")
    with pytest.raises(PruneError, match=r"1 are NaN"):
        compute_keep(model, "ratio", 0.5, input_shape=(1, 2, 2))
