"""Channel surgery: build the slim model from a dense one and per-BatchNorm keep masks.

The slim model is a ``torch.fx.GraphModule`` traced from a copy of the dense model, so the
surviving modules keep their names (``features.0.weight`` stays ``features.0.weight``)
and a checkpoint's ``state_dict`` lines up with the dense architecture plus the kept widths.
For every prunable BatchNorm that loses channels:

- the BatchNorm keeps the selected γ, β and running statistics;
- its producer conv/linear keeps the matching output channels (and bias), or — when the
  BatchNorm reads a tensor that also goes elsewhere — a :class:`ChannelSelection` named
  ``<bn>_select`` is inserted in front of it;
- every consumer conv/linear keeps the matching input channels (``H·W`` columns per channel
  after a flatten), and view/reshape flattens on the way become ``torch.flatten(x, 1)`` so
  that no hard-coded size survives.

With ``fold_shift`` the constant a pruned channel's shift β fed to its consumers is first
folded into their biases or the following BatchNorm's running mean (:mod:`slimcli.prune.fold`).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.nn.modules.conv import _ConvNd

from slimcli.errors import PruneError
from slimcli.measure import count_params
from slimcli.prune.fold import ShiftFold, fold_shifts, fold_summary
from slimcli.prune.graph import Analysis, BNInfo, Edit, analyze
from slimcli.prune.select import ChannelSelection

#: The structure of a slim model, as stored in checkpoints: prunable BN name → kept channels.
Widths = dict[str, int]

_QUERY_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class LayerReport:
    """One BatchNorm in a pruning report: how many channels it had and kept, and how."""

    name: str
    channels: int
    kept: int
    prunable: bool
    reason: str | None
    producer: str | None
    needs_selection: bool
    #: (channels the rule alone kept, channels kept) where ``min_channels`` raised the count
    min_channels_bit: tuple[int, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "channels": self.channels, "kept": self.kept, "prunable": self.prunable,
            "reason": self.reason, "producer": self.producer, "needs_selection": self.needs_selection,
            "min_channels_bit": list(self.min_channels_bit) if self.min_channels_bit else None,
        }


@dataclass
class PruneReport:
    """What :func:`prune_model` did: per-layer kept counts, the widths, totals."""

    layers: list[LayerReport]
    widths: Widths
    params_before: int
    params_after: int
    plan: dict[str, Any] = field(default_factory=dict)  # the rule, threshold, … when a KeepPlan was used
    fold_shift: bool = False
    #: with fold_shift: where each pruned BN's constant went (or why it did not)
    folds: list[ShiftFold] = field(default_factory=list)

    @property
    def channels_before(self) -> int:
        """Channels of the prunable BatchNorms before pruning."""
        return sum(r.channels for r in self.layers if r.prunable)

    @property
    def channels_after(self) -> int:
        return sum(r.kept for r in self.layers if r.prunable)

    @property
    def params_pruned_ratio(self) -> float:
        """1 − params(slim)/params(dense), the paper's "parameters pruned"."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def min_channels_bit(self) -> dict[str, tuple[int, int]]:
        return {r.name: r.min_channels_bit for r in self.layers if r.min_channels_bit}

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.plan,
            "widths": dict(self.widths),
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [r.as_dict() for r in self.layers],
            "fold_shift": self.fold_shift,
            **({"fold": fold_summary(self.folds)} if self.fold_shift else {}),
        }


def _masks_of(plan: Any) -> Mapping[str, Tensor]:
    masks = getattr(plan, "masks", plan)
    if not isinstance(masks, Mapping):
        raise TypeError(f"expected a KeepPlan or a dict of masks, got {type(plan).__name__}")
    return masks


def masked_dense(model: nn.Module, masks: Any, *, keep_shift: bool = False) -> nn.Module:
    """A copy of ``model`` with γ and β of the pruned channels set to zero.

    Its output is what the slim model must reproduce (before fine-tuning): a zeroed channel
    leaves its BatchNorm as exact zeros, which is what removing it means. ``keep_shift``
    zeroes γ only: the pruned channels output their constant β, which is what a slim model
    pruned with ``fold_shift`` approximates (exactly where no zero padding intervenes).
    """
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in _masks_of(masks).items():
            bn = dict(dense.named_modules()).get(name)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None:
                raise PruneError(f"'{name}' is not a BatchNorm with a scale γ in this model; the masks do "
                                 f"not match the architecture")
            # the same mask forms prune_model accepts (any shape with one entry per channel)
            drop = ~torch.as_tensor(mask).reshape(-1).to(bn.weight.device, torch.bool)
            if drop.numel() != bn.weight.numel():
                raise PruneError(f"the mask for '{name}' has {drop.numel()} entries but the layer has "
                                 f"{bn.weight.numel()} channels; masks and model do not match")
            bn.weight[drop] = 0
            if bn.bias is not None and not keep_shift:
                bn.bias[drop] = 0
    return dense


def _check_masks(analysis: Analysis, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validate the masks against the analysis; return the kept indices of layers that shrink."""
    keep: dict[str, Tensor] = {}
    emptied: list[str] = []
    for name, mask in masks.items():
        info = analysis.bns.get(name)
        if info is None:
            raise PruneError(f"'{name}' is not a BatchNorm of this model; the masks (or widths) do not "
                             f"match the architecture")
        mask = torch.as_tensor(mask).reshape(-1).to("cpu", torch.bool)
        if mask.numel() != info.channels:
            raise PruneError(f"the mask for '{name}' has {mask.numel()} entries but the layer has "
                             f"{info.channels} channels; masks and model do not match")
        kept = int(mask.sum())
        if kept == info.channels:
            continue
        if not info.prunable:
            raise PruneError(f"'{name}' cannot be pruned: {info.reason}; keep all its channels")
        if kept == 0:
            emptied.append(name)
            continue
        keep[name] = mask.nonzero().reshape(-1)
    if emptied:
        raise PruneError(f"pruning would remove every channel of {', '.join(emptied)}; use a smaller "
                         f"ratio or threshold, or min_channels >= 1 (--min-channels 1)")
    return keep


def _slice(module: nn.Module, attr: str, index: Tensor, dim: int) -> None:
    t = getattr(module, attr, None)
    if t is None:
        return
    new = t.detach().index_select(dim, index.to(t.device))
    if isinstance(t, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, attr, new)


def _narrow_outputs(m: nn.Module, index: Tensor) -> None:
    _slice(m, "weight", index, 0)
    _slice(m, "bias", index, 0)
    if isinstance(m, _ConvNd):
        m.out_channels = index.numel()
    else:
        m.out_features = index.numel()


def _narrow_inputs(m: nn.Module, index: Tensor, per_channel: int) -> None:
    if per_channel > 1:  # after a flatten, channel c is the block of input features [c·k, (c+1)·k)
        index = (index[:, None] * per_channel + torch.arange(per_channel)).reshape(-1)
    _slice(m, "weight", index, 1)
    if isinstance(m, _ConvNd):
        m.in_channels = index.numel()
    else:
        m.in_features = index.numel()


def _narrow_bn(m: nn.Module, index: Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _slice(m, attr, index, 0)
    m.num_features = index.numel()


def _selection_name(gm: GraphModule, bn_name: str) -> str:
    taken = {name for name, _ in gm.named_modules()}
    base = f"{bn_name}_select"
    name, i = base, 1
    while name in taken:
        name, i = f"{base}{i}", i + 1
    return name


def _erase_dead_queries(gm: GraphModule, nodes: Sequence[Any]) -> None:
    """Remove size/shape queries that only fed a rewritten flatten."""
    todo = [n for n in nodes if isinstance(n, Node)]
    while todo:
        n = todo.pop()
        is_query = (n.op == "call_method" and n.target in _QUERY_METHODS) or (n.op == "call_function" and (
            n.target is getattr or n.target is operator.getitem))
        if is_query and not n.users and n in gm.graph.nodes:
            todo.extend(n.all_input_nodes)
            gm.graph.erase_node(n)


def _apply_edit(gm: GraphModule, name: str, edit: Edit, index: Tensor) -> None:
    graph = gm.graph
    _narrow_bn(gm.get_submodule(name), index)
    if edit.producer is not None:
        _narrow_outputs(gm.get_submodule(edit.producer.target), index)
    elif edit.selection is not None:  # compose with the selection already there (re-pruning)
        sel = gm.get_submodule(edit.selection.target)
        sel.indices = sel.indices.index_select(0, index.to(sel.indices.device))
    else:
        sel_name = _selection_name(gm, name)
        ref = gm.get_submodule(name).weight
        gm.add_submodule(sel_name, ChannelSelection(index.to(ref.device)))
        with graph.inserting_before(edit.bn):
            sel_node = graph.call_module(sel_name, (edit.bn.args[0],))
        edit.bn.update_arg(0, sel_node)
    for node, per_channel in edit.consumers:
        _narrow_inputs(gm.get_submodule(node.target), index, per_channel)
    for fl in edit.flattens:
        if fl not in graph.nodes:
            continue
        with graph.inserting_before(fl):
            new = graph.call_function(torch.flatten, (fl.args[0], 1))
        fl.replace_all_uses_with(new)
        args = list(fl.all_input_nodes)
        graph.erase_node(fl)
        _erase_dead_queries(gm, args)


def _surgery(analysis: Analysis, keep: Mapping[str, Tensor]) -> GraphModule:
    gm = analysis.gm
    for name, index in keep.items():
        _apply_edit(gm, name, analysis.edits[name], index)
    gm.graph.lint()
    gm.recompile()
    return gm


def _widths(bns: Mapping[str, BNInfo], keep: Mapping[str, Tensor]) -> Widths:
    return {n: (keep[n].numel() if n in keep else b.channels) for n, b in bns.items() if b.prunable}


def prune_model(
    model: nn.Module, plan: Any, *, input_shape: Sequence[int] | None = None, fold_shift: bool = False
) -> tuple[GraphModule, PruneReport]:
    """Remove the channels that ``plan`` drops; return the slim model and a report.

    ``plan`` is a :class:`~slimcli.prune.rules.KeepPlan` or a dict ``BN name → bool mask``
    (missing BatchNorms keep everything). The dense ``model`` is not modified. The input
    shape comes from ``input_shape``, the plan, or the model's ``input_shape`` attribute.
    ``fold_shift`` folds the constant each removed channel's β fed to the next layers into
    their biases / BatchNorm running means (``report.folds``) instead of dropping it; the
    structure, and so ``report.widths``, is the same either way.
    """
    masks = _masks_of(plan)
    shape = input_shape if input_shape is not None else getattr(plan, "input_shape", None)
    if shape is None:
        shape = getattr(model, "input_shape", None)
    analysis = analyze(copy.deepcopy(model), shape)
    keep = _check_masks(analysis, masks)
    params_before = count_params(model)
    folds = fold_shifts(analysis, keep) if fold_shift else []
    gm = _surgery(analysis, keep)
    widths = _widths(analysis.bns, keep)
    gm.slim_widths = dict(widths)
    bit = dict(getattr(plan, "min_channels_bit", {}) or {})
    layers = [
        LayerReport(
            name=n, channels=b.channels, kept=widths.get(n, b.channels), prunable=b.prunable,
            reason=b.reason, producer=b.producer, needs_selection=b.prunable and b.needs_selection,
            min_channels_bit=bit.get(n),
        )
        for n, b in analysis.bns.items()
    ]
    summary = plan.summary() if hasattr(plan, "summary") else {}
    return gm, PruneReport(layers, widths, params_before, count_params(gm), summary, fold_shift, folds)


def apply_widths(
    model: nn.Module, widths: Mapping[str, int], *, input_shape: Sequence[int] | None = None
) -> GraphModule:
    """The slim structure for ``widths`` (BN name → kept channels), built from a dense model.

    Every listed BatchNorm keeps its first ``k`` channels, so the result has exactly the
    shapes of the pruned model; ``load_state_dict(strict=True)`` of the pruned model's
    ``state_dict`` then fills in its weights and selection indices. The dense ``model`` is
    not modified; the input shape defaults to its ``input_shape`` attribute.
    """
    return rebuild(analyze(copy.deepcopy(model), input_shape), widths, name=type(model).__name__)


def rebuild(analysis: Analysis, widths: Mapping[str, int], *, name: str = "the model") -> GraphModule:
    """:func:`apply_widths` on an analysis (consumed: pass ``analysis.clone()`` to reuse it)."""
    masks: dict[str, Tensor] = {}
    for bn, k in widths.items():
        info = analysis.bns.get(bn)
        if info is None:
            raise PruneError(f"the widths name '{bn}', which is not a BatchNorm of {name}; the "
                             f"checkpoint and the architecture do not match")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= info.channels:
            raise PruneError(f"width of '{bn}' must be an integer in 1..{info.channels}, got {k!r}")
        mask = torch.zeros(info.channels, dtype=torch.bool)
        mask[:k] = True
        masks[bn] = mask
    keep = _check_masks(analysis, masks)
    gm = _surgery(analysis, keep)
    gm.slim_widths = _widths(analysis.bns, keep)
    return gm
