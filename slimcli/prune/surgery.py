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
import math
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
from slimcli.prune.graph import Analysis, BNInfo, analyze
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
    #: the first BatchNorm of its coupled group (pruned jointly), None when it prunes alone
    group: str | None = None
    #: how its pruned channels are realised: ``narrow`` (removed at the source), ``selection``
    #: (a channel selection in front), ``zero`` (kept with γ = β = 0: exact, no gather)
    form: str | None = None
    #: channels in the slim structure (``kept`` plus zeroed ones)
    width: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "channels": self.channels, "kept": self.kept, "prunable": self.prunable,
            "reason": self.reason, "producer": self.producer, "needs_selection": self.needs_selection,
            "min_channels_bit": list(self.min_channels_bit) if self.min_channels_bit else None,
            "group": self.group, "form": self.form, "width": self.width,
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
    #: how coupled channels were pruned (``auto``, ``joint``, ``select``)
    coupling: str = "auto"
    #: prunable BN name → kept-channel mask relative to the *dense* architecture (the checkpoint's
    #: ``slim.keep``: with the coupling, it rebuilds the exact structure)
    keep: dict[str, Tensor] = field(default_factory=dict)

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
            "coupling": self.coupling,
            "groups": self.groups,
            **({"fold": fold_summary(self.folds)} if self.fold_shift else {}),
        }

    @property
    def groups(self) -> dict[str, list[str]]:
        """Coupled groups: first BatchNorm → every BatchNorm pruned jointly with it."""
        out: dict[str, list[str]] = {}
        for r in self.layers:
            if r.group is not None:
                out.setdefault(r.group, []).append(r.name)
        return out


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
    """Validate the masks against the analysis; return the kept indices of layers that shrink.

    Coupled channels (one class of :mod:`slimcli.prune.groups`) must be kept or dropped
    together in every BatchNorm that has them.
    """
    keep: dict[str, Tensor] = {}
    full: dict[str, Tensor] = {}
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
        if info.classes is not None:
            frozen = torch.tensor([c < 0 for c in info.classes]) & ~mask
            if bool(frozen.any()):
                first = int(frozen.nonzero()[0])
                raise PruneError(f"channel {first} of '{name}' cannot be pruned (it is tied "
                                 f"to a part of the network that keeps its channels); keep it")
        if kept == 0:
            emptied.append(name)
            continue
        keep[name] = mask.nonzero().reshape(-1)
        full[name] = mask
    if emptied:
        raise PruneError(f"pruning would remove every channel of {', '.join(emptied)}; use a smaller "
                         f"ratio or threshold, or min_channels >= 1 (--min-channels 1)")
    _check_coupled(analysis, full)
    return keep


def _check_coupled(analysis: Analysis, masks: Mapping[str, Tensor]) -> None:
    """Every class is dropped by all the BatchNorms that have it, or by none."""
    dropped: dict[int, str] = {}
    for name, mask in masks.items():
        classes = analysis.bns[name].classes
        if classes is not None:
            for c in torch.tensor(classes)[~mask].tolist():
                dropped.setdefault(c, name)
    if not dropped:
        return
    for name, info in analysis.bns.items():
        if info.classes is None:
            continue
        mask = masks.get(name)
        kept = torch.tensor(info.classes) if mask is None else torch.tensor(info.classes)[mask]
        clash = [c for c in kept.tolist() if c in dropped]
        if clash:
            raise PruneError(f"'{dropped[clash[0]]}' drops a channel that '{name}' keeps, but their channels "
                             f"are "
                             f"coupled ({info.group or name} group) and must be removed together; build the "
                             f"masks with compute_keep, which scores each coupled group as one")


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


def _narrow_inputs(m: nn.Module, index: Tensor) -> None:
    """Keep the input channels (or, after a flatten, the input features) at ``index``."""
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
    """Remove size/shape queries that only fed a rewritten op."""
    todo = [n for n in nodes if isinstance(n, Node)]
    while todo:
        n = todo.pop()
        is_query = (n.op == "call_method" and n.target in _QUERY_METHODS) or (n.op == "call_function" and (
            n.target is getattr or n.target is operator.getitem))
        if is_query and not n.users and n in gm.graph.nodes:
            todo.extend(n.all_input_nodes)
            gm.graph.erase_node(n)


class _Kept:
    """Which positions of each tensor survive once the removed classes are gone."""

    def __init__(self, analysis: Analysis, keep: Mapping[str, Tensor]) -> None:
        flow = analysis.flow
        assert flow is not None
        self.flow = flow
        self.table = flow.table
        removed: set[int] = set()
        for name, index in keep.items():
            ids = flow.bns[name][1]
            mask = torch.ones(ids.numel(), dtype=torch.bool)
            mask[index] = False
            removed.update(self.table[ids[mask]].tolist())
        self.removed = torch.tensor(sorted(removed), dtype=torch.long)

    def mask(self, node: Any) -> Tensor | None:
        """Kept-position mask of ``node``'s channels, or None when it keeps all of them."""
        ids = self.flow.ids.get(node) if isinstance(node, Node) else None
        if ids is None or not self.removed.numel():
            return None
        mask = ~torch.isin(self.table[ids], self.removed)
        if bool(mask.all()):
            return None
        if not bool(mask.any()):
            raise PruneError(f"pruning would remove every channel of '{node.name}' (a tensor between the "
                             f"BatchNorms); prune less, or raise min_channels (--min-channels)")
        return mask

    def index(self, node: Any) -> Tensor | None:
        mask = self.mask(node)
        return None if mask is None else mask.nonzero().reshape(-1)


def _narrow_depthwise(m: _ConvNd, index_in: Tensor | None, index_out: Tensor | None) -> None:
    if index_out is not None:
        _slice(m, "weight", index_out, 0)
        _slice(m, "bias", index_out, 0)
        m.out_channels = index_out.numel()
    if index_in is not None:
        m.in_channels = index_in.numel()
        m.groups = index_in.numel()


def _rewrite(
    gm: GraphModule, node: Node, kind: str, kept: _Kept, shapes: Mapping[str, tuple[int, ...]],
    original: Node,
) -> None:
    """Replace a slice, split or reshape whose literal channel sizes the pruning changed.

    ``original`` is the node's input in the analysed graph (an earlier rewrite may have replaced
    it: its channels are still those of the original)."""
    graph = gm.graph
    src = node.args[0]
    in_mask = kept.mask(original)
    if in_mask is None and not (kind == "reshape" and kept.mask(node) is not None):
        return
    old_args = list(node.all_input_nodes)
    if kind == "flatten":
        with graph.inserting_before(node):
            new = graph.call_function(torch.flatten, (src, 1))
    elif kind == "reshape":
        out = shapes[node.name]
        out_mask = kept.mask(node)
        c = int(out_mask.sum()) if out_mask is not None else out[1]
        with graph.inserting_before(node):
            new = graph.call_function(torch.reshape, (src, (-1, c, *out[2:])))
    elif kind == "grid":  # (N, C, …) → (N, g, C/g, …) of a channel shuffle, with the kept C
        out = shapes[node.name]
        with graph.inserting_before(node):
            kept_c = int(in_mask.sum())
            new = graph.call_function(torch.reshape, (src, (-1, out[1], kept_c // out[1], *out[3:])))
    elif kind == "slice":
        index = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
        sl = index[1]
        rng = range(in_mask.numel())[sl]
        start, stop = rng.start, rng.stop
        new_slice = slice(int(in_mask[:start].sum()), int(in_mask[:stop].sum()))
        index[1] = new_slice
        node.update_arg(1, tuple(index))
        return
    elif kind == "split":
        sizes = [int(p.sum()) for p in in_mask.split(_piece_sizes(node, shapes[original.name][1]))]
        if 0 in sizes:
            raise PruneError(f"pruning would empty a piece of the split '{node.name}'; prune less, or raise "
                             f"min_channels (--min-channels)")
        with graph.inserting_before(node):
            new = graph.call_function(torch.split, (src, sizes, 1))
    else:  # pragma: no cover - the flow only records the kinds above
        raise AssertionError(kind)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    _erase_dead_queries(gm, old_args)


def _piece_sizes(node: Node, channels: int) -> list[int]:
    name = node.target if isinstance(node.target, str) else node.target.__name__
    arg = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()))
    rows = torch.arange(channels)
    return [p.numel() for p in (rows.chunk(arg) if name == "chunk" else rows.split(arg))]


#: ``selections="auto"``: a channel selection (an ONNX ``Gather``) is kept where the MACs it saves in
#: the next layer reach this many per element it copies; elsewhere the BatchNorm keeps its width with
#: γ = β = 0 on the pruned channels (exact, no gather). From onnxruntime CPU measurements
#: (benchmarks/edge_latency.py, docs/benchmarks.md): ResNet-164's selections save ≤ ~64 MACs per
#: copied element and were slower than the zero form; DenseNet-40's save ~108 and were faster.
GATHER_WORTH = 96.0
SELECTIONS = ("auto", "gather", "zero")


def _gather_worth(analysis: Analysis, name: str, kept: int) -> float:
    """MACs the narrowed consumers save per element the selection in front of ``name`` copies."""
    info = analysis.bns[name]
    if not info.consumers or not kept:
        return math.inf
    nodes = {n.target: n for n in analysis.gm.graph.nodes if n.op == "call_module"}
    bn_node = analysis.flow.bns[name][0] if analysis.flow is not None else None
    shape = analysis.shapes.get(bn_node.name, ()) if bn_node is not None else ()
    if len(shape) < 2:
        return math.inf
    copied = kept * math.prod(shape[2:])
    pruned = info.channels - kept
    saved = 0.0
    for consumer in info.consumers:
        m = analysis.gm.get_submodule(consumer)
        out = analysis.shapes.get(nodes[consumer].name, ()) if consumer in nodes else ()
        per_out = math.prod(out[2:]) if len(out) > 2 else 1
        saved += m.weight.numel() * per_out * pruned / info.channels
    return saved / copied


def _zero_in_place(analysis: Analysis, keep: Mapping[str, Tensor], selections: str, *, apply: bool = True
                   ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Realise some selections as zeroed channels instead: (keep after that, BN name → form).

    A selected BatchNorm realised by ``zero`` keeps its width, with γ and β of its pruned channels
    set to zero, so that those channels are exact zeros (which the next layers read as before):
    exact, no gather; every BatchNorm coupled with it is treated alike.
    """
    flow = analysis.flow
    assert flow is not None
    forms: dict[str, str] = {}
    zero_bns = []
    for name, index in keep.items():
        if name not in flow.selected:
            forms[name] = "narrow"
            continue
        worth = _gather_worth(analysis, name, index.numel())
        zero = selections == "zero" or (selections == "auto" and worth < GATHER_WORTH)
        form = "zero" if zero else "selection"
        forms[name] = form
        if form == "zero":
            zero_bns.append(name)
    if not zero_bns:
        return dict(keep), forms
    table = flow.table

    def pruned_roots(name: str, index: Tensor) -> Tensor:
        ids = flow.bns[name][1]
        mask = torch.ones(ids.numel(), dtype=torch.bool)
        mask[index] = False
        return table[ids[mask]]

    zero_roots = torch.unique(torch.cat([pruned_roots(n, keep[n]) for n in zero_bns]))
    out: dict[str, Tensor] = {}
    for name, index in keep.items():
        ids = flow.bns[name][1]
        mask = torch.zeros(ids.numel(), dtype=torch.bool)
        mask[index] = True
        zeroed = ~mask & torch.isin(table[ids], zero_roots)
        if bool(zeroed.any()) and apply:
            bn = analysis.gm.get_submodule(name)
            with torch.no_grad():
                bn.weight[zeroed.to(bn.weight.device)] = 0
                if bn.bias is not None:
                    bn.bias[zeroed.to(bn.bias.device)] = 0
        if bool(zeroed.any()):
            forms[name] = "zero"
            mask |= zeroed
        if not bool(mask.all()):
            out[name] = mask.nonzero().reshape(-1)
    return out, forms


def realise(
    analysis: Analysis, masks: Mapping[str, Tensor], selections: str = "gather"
) -> dict[str, Tensor]:
    """The structural keep masks ``prune_model`` builds for ``masks``: zero-realised channels kept."""
    keep, _ = _zero_in_place(analysis, _check_masks(analysis, masks), selections, apply=False)
    out = {}
    for name, info in analysis.bns.items():
        if name in masks and info.prunable:
            mask = torch.zeros(info.channels, dtype=torch.bool)
            mask[keep[name] if name in keep else torch.arange(info.channels)] = True
            out[name] = mask
    return out


def _surgery(analysis: Analysis, keep: Mapping[str, Tensor]) -> GraphModule:
    """Remove every class ``keep`` drops from every module and tensor that carries it."""
    gm = analysis.gm
    if not keep:
        gm.recompile()
        return gm
    kept = _Kept(analysis, keep)
    flow = kept.flow
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            index = kept.index(node)
            if index is None:
                continue
            _narrow_bn(m, index)
            if node.target in flow.selected:
                sel_name = _selection_name(gm, node.target)
                ref = m.weight if m.weight is not None else m.running_mean
                gm.add_submodule(sel_name, ChannelSelection(index.to(ref.device)))
                with graph.inserting_before(node):
                    sel_node = graph.call_module(sel_name, (src,))
                node.update_arg(0, sel_node)
        elif isinstance(m, ChannelSelection):
            index = kept.index(node)
            if index is not None:
                m.indices = m.indices.index_select(0, index.to(m.indices.device))
        elif isinstance(m, _ConvNd) and m.groups > 1 and m.groups == m.in_channels:
            index_in, index_out = kept.index(src), kept.index(node)
            if index_in is not None or index_out is not None:
                _narrow_depthwise(m, index_in, index_out)
        elif isinstance(m, _ConvNd) and m.groups > 1:
            index_in, index_out = kept.index(src), kept.index(node)
            if index_in is not None:  # the same positions in every group: slice the first group's
                per_group = m.in_channels // m.groups
                _slice(m, "weight", index_in[index_in < per_group], 1)
                m.in_channels = index_in.numel()
            if index_out is not None:
                _narrow_outputs(m, index_out)
        elif isinstance(m, _ConvNd | nn.Linear):
            index_in, index_out = kept.index(src), kept.index(node)
            if index_in is not None:
                _narrow_inputs(m, index_in)
            if index_out is not None:
                _narrow_outputs(m, index_out)
    originals = {node: node.args[0] for node in flow.rewrites}
    for node, kind in list(flow.rewrites.items()):
        if node in graph.nodes:
            _rewrite(gm, node, kind, kept, analysis.shapes, originals[node])
    graph.lint()
    gm.recompile()
    return gm


def _widths(bns: Mapping[str, BNInfo], keep: Mapping[str, Tensor]) -> Widths:
    return {n: (keep[n].numel() if n in keep else b.channels) for n, b in bns.items() if b.prunable}


def encode_keep(masks: Mapping[str, Tensor]) -> dict[str, str]:
    """Masks as hex strings (bit i = channel i kept), the checkpoint's ``slim.keep``."""
    out = {}
    for name, mask in masks.items():
        bits = torch.as_tensor(mask).reshape(-1).to(torch.bool).tolist()
        out[name] = f"{len(bits)}:" + format(sum(1 << i for i, b in enumerate(bits) if b), "x")
    return out


def decode_keep(encoded: Mapping[str, Any]) -> dict[str, Tensor]:
    """The inverse of :func:`encode_keep`; a malformed entry is a :class:`PruneError` naming it."""
    out = {}
    for name, text in encoded.items():
        try:
            size, _, hexa = str(text).partition(":")
            n, value = int(size), int(hexa, 16)
            if n < 1 or value >> n:
                raise ValueError(text)
        except ValueError:
            raise PruneError(f"slim.keep['{name}'] is not a channel mask (\"<channels>:<hex bits>\"), got "
                             f"{str(text)[:40]!r}") from None
        out[name] = torch.tensor([(value >> i) & 1 == 1 for i in range(n)], dtype=torch.bool)
    return out


def _dense_keep(model: nn.Module, bns: Mapping[str, BNInfo], keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Kept masks relative to the dense architecture: composed with ``model.slim_keep`` when the
    model is itself a slim model (re-pruning)."""
    before: Mapping[str, Tensor] = getattr(model, "slim_keep", None) or {}
    out: dict[str, Tensor] = {}
    for name, info in bns.items():
        if not info.prunable and name not in before:
            continue
        mask = torch.zeros(info.channels, dtype=torch.bool)
        mask[keep[name] if name in keep else torch.arange(info.channels)] = True
        old = before.get(name)
        if old is not None:
            dense = torch.zeros(old.numel(), dtype=torch.bool)
            dense[old.nonzero().reshape(-1)[mask]] = True
            mask = dense
        out[name] = mask
    return out


def prune_model(
    model: nn.Module, plan: Any, *, input_shape: Sequence[int] | None = None, fold_shift: bool = False,
    coupling: str | None = None, selections: str = "gather",
) -> tuple[GraphModule, PruneReport]:
    """Remove the channels that ``plan`` drops; return the slim model and a report.

    ``plan`` is a :class:`~slimcli.prune.rules.KeepPlan` or a dict ``BN name → bool mask``
    (missing BatchNorms keep everything). The dense ``model`` is not modified. The input
    shape comes from ``input_shape``, the plan, or the model's ``input_shape`` attribute.
    ``fold_shift`` folds the constant each removed channel's β fed to the next layers into
    their biases / BatchNorm running means (``report.folds``) instead of dropping it; the
    structure, and so ``report.widths``, is the same either way. ``coupling`` defaults to the
    plan's (``auto`` for plain masks); coupled channels must be kept or dropped together.
    ``selections`` says how a BatchNorm that reads a shared tensor loses channels: ``gather``
    (default, network slimming's channel selection in front), ``zero`` (it keeps its width,
    γ = β = 0 on the pruned channels, no gather) or ``auto`` (a selection only where it saves
    enough MACs per copied element: :data:`GATHER_WORTH`); ``report.layers[i].form`` says what was chosen.
    """
    if selections not in SELECTIONS:
        raise PruneError(f"selections must be one of {', '.join(SELECTIONS)}, got {selections!r}")
    masks = _masks_of(plan)
    coupling = coupling or getattr(plan, "coupling", None) or "auto"
    shape = input_shape if input_shape is not None else getattr(plan, "input_shape", None)
    if shape is None:
        shape = getattr(model, "input_shape", None)
    analysis = analyze(copy.deepcopy(model), shape, coupling=coupling)
    keep = _check_masks(analysis, masks)
    params_before = count_params(model)
    folds = fold_shifts(analysis, keep) if fold_shift else []
    effective = _widths(analysis.bns, keep)
    keep, forms = _zero_in_place(analysis, keep, selections)
    gm = _surgery(analysis, keep)
    widths = _widths(analysis.bns, keep)
    dense_keep = _dense_keep(model, analysis.bns, keep)
    gm.slim_widths = dict(widths)
    gm.slim_keep = dense_keep
    gm.slim_coupling = coupling
    bit = dict(getattr(plan, "min_channels_bit", {}) or {})
    layers = [
        LayerReport(
            name=n, channels=b.channels, kept=effective.get(n, b.channels), prunable=b.prunable,
            reason=b.reason, producer=b.producer,
            needs_selection=b.prunable and b.needs_selection and forms.get(n) != "zero",
            min_channels_bit=bit.get(n), group=b.group, form=forms.get(n), width=widths.get(n),
        )
        for n, b in analysis.bns.items()
    ]
    summary = plan.summary() if hasattr(plan, "summary") else {}
    return gm, PruneReport(layers, widths, params_before, count_params(gm), summary, fold_shift, folds,
                           coupling, dense_keep)


def apply_widths(
    model: nn.Module, widths: Mapping[str, int], *, input_shape: Sequence[int] | None = None,
    keep: Mapping[str, Tensor] | None = None, coupling: str = "auto",
) -> GraphModule:
    """The slim structure for ``widths`` (BN name → kept channels), built from a dense model.

    Every listed BatchNorm keeps its first ``k`` channels — or, with ``keep`` (the masks of
    ``PruneReport.keep`` / the checkpoint's ``slim.keep``), exactly the channels its mask keeps,
    which coupled groups whose members do not line up position by position need. The result
    has exactly the shapes of the pruned model; ``load_state_dict(strict=True)`` of the pruned
    model's ``state_dict`` then fills in its weights and selection indices. The dense ``model``
    is not modified; the input shape defaults to its ``input_shape`` attribute.
    """
    analysis = analyze(copy.deepcopy(model), input_shape, coupling=coupling)
    return rebuild(analysis, widths, name=type(model).__name__, keep=keep)


def rebuild(analysis: Analysis, widths: Mapping[str, int], *, name: str = "the model",
            keep: Mapping[str, Tensor] | None = None) -> GraphModule:
    """:func:`apply_widths` on an analysis (consumed: pass ``analysis.clone()`` to reuse it)."""
    masks: dict[str, Tensor] = {}
    for bn, k in widths.items():
        info = analysis.bns.get(bn)
        if info is None:
            raise PruneError(f"the widths name '{bn}', which is not a BatchNorm of {name}; the "
                             f"checkpoint and the architecture do not match")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= info.channels:
            raise PruneError(f"width of '{bn}' must be an integer in 1..{info.channels}, got {k!r}")
        given = keep.get(bn) if keep is not None else None
        if given is not None:
            mask = torch.as_tensor(given).reshape(-1).to(torch.bool)
            if mask.numel() != info.channels or int(mask.sum()) != k:
                raise PruneError(f"the kept-channel mask of '{bn}' ({int(mask.sum())} of {mask.numel()}) "
                                 f"does not match its width {k} of {info.channels}; the checkpoint is "
                                 f"inconsistent")
        else:  # the first k channels, counting every channel that can never go as kept
            mask = torch.zeros(info.channels, dtype=torch.bool)
            fixed = torch.tensor([c < 0 for c in info.classes], dtype=torch.bool) if info.classes else mask
            free = (~fixed).nonzero().reshape(-1)
            mask[fixed] = True
            mask[free[: max(k - int(fixed.sum()), 0)]] = True
        masks[bn] = mask
    checked = _check_masks(analysis, masks)
    gm = _surgery(analysis, checked)
    gm.slim_widths = _widths(analysis.bns, checked)
    gm.slim_keep = {bn: m.clone() for bn, m in masks.items()}
    gm.slim_coupling = analysis.coupling
    return gm
