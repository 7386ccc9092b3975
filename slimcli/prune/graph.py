"""Graph analysis: which BatchNorms can lose channels, with which others, and why not.

The model is traced with torch.fx (BatchNorms, including subclasses with a built-in
activation, stay single nodes) and run once on a small zero input to record every tensor's
shape. The channel flow of :mod:`slimcli.prune.groups` then gives every channel a coupled
class; a BatchNorm is prunable when at least one of its classes may go, and its
:class:`BNInfo` carries those classes (shared ids = removed together), the group it belongs
to and, where nothing may go, the reason. Two older walks stay for reports and the shift
folding: **backwards** to the producer the BatchNorm reads (``BNInfo.producer``, ``reads``)
and **forwards** through zero-preserving channel-wise ops to the convs and linears that
consume it alone (``BNInfo.consumers``, :class:`Edit`). The rules are conservative on
purpose: a wrong "prunable" would silently change the network; a wrong "not prunable" only
keeps a few channels.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node, Tracer
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimcli.errors import PruneError
from slimcli.prune.groups import COUPLINGS, Flow, channel_flow, groups_of, is_plain_or_fused_bn
from slimcli.prune.ops import (
    ADD,
    CAT,
    SHAPE_BATCH,
    call_counts,
    describe,
    flattens_shape,
    is_channelwise,
    is_flatten,
    is_shape_query,
    is_weight_layer,
)
from slimcli.prune.select import ChannelSelection


@dataclass(frozen=True)
class BNInfo:
    """What the analysis found out about one BatchNorm.

    ``producer`` is the module whose output channels shrink with the BatchNorm (``None``
    when a channel selection goes in front of it instead: ``needs_selection``);
    ``consumers`` are the modules that lose the matching input channels; ``reads``
    describes the BatchNorm's input, ``reason`` why it is not prunable.
    """

    name: str
    kind: str
    channels: int
    prunable: bool
    reason: str | None
    producer: str | None
    consumers: tuple[str, ...]
    needs_selection: bool
    reads: str
    #: the first BatchNorm (graph order) of its coupled group; None when it prunes alone
    group: str | None = None
    #: per channel: the id of its coupled class (shared by every BN channel removed with it), or
    #: -1 where the channel can never be removed (a frozen class); None: every channel is its own
    classes: tuple[int, ...] | None = None

    @property
    def frozen_channels(self) -> int:
        """Channels of a prunable BatchNorm that must stay (their class is tied to something fixed)."""
        return sum(1 for c in self.classes if c < 0) if self.classes is not None else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "channels": self.channels, "prunable": self.prunable,
            "reason": self.reason, "producer": self.producer, "consumers": list(self.consumers),
            "needs_selection": self.needs_selection, "reads": self.reads, "group": self.group,
            "frozen_channels": self.frozen_channels,
        }


class BNTable(dict):  # type: ignore[type-arg]
    """BN name → :class:`BNInfo`, plus ``keep_one``: sets of coupled classes that together are all
    the channels of some tensor between the BatchNorms (a split piece, a slice, a conv output read
    only through other layers' BatchNorms); the rules keep at least one class of each, as
    ``min_channels`` does for a BatchNorm, so that no tensor is emptied."""

    keep_one: list[tuple[int, ...]]
    #: the classes of every tensor an op creates (a conv's or a selection's output): the units whose
    #: kept counts ``round_to`` rounds, so that convs get round channel counts on both sides
    units: list[tuple[int, ...]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_one = []
        self.units = []


@dataclass
class Edit:
    """A BatchNorm that prunes alone through channel-wise ops into its consumers (what the shift
    folding follows; the surgery itself works on the channel flow)."""

    bn: Node
    consumers: list[tuple[Node, int]]  # (conv/linear node, input features per channel)


@dataclass
class Analysis:
    """A traced model (sharing the analysed model's modules), its BatchNorms and their edits."""

    gm: GraphModule
    input_shape: tuple[int, ...]
    bns: dict[str, BNInfo]
    edits: dict[str, Edit] = field(default_factory=dict)
    #: node name → tensor shape in the zero-input run (batch 2)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: the channel flow: ids, classes, selections (see :mod:`slimcli.prune.groups`)
    flow: Flow | None = None
    coupling: str = "auto"

    @property
    def prunable(self) -> dict[str, BNInfo]:
        return {k: v for k, v in self.bns.items() if v.prunable}

    def clone(self) -> Analysis:
        """A deep copy (modules and graph) whose edits point at the copied nodes.

        Rebuilding many slim models from one dense model (target search, what-if) then costs
        a copy and the surgery, not a trace and a shape run each time.
        """
        gm = copy.deepcopy(self.gm)
        nodes = {n.name: n for n in gm.graph.nodes}

        edits = {name: Edit(nodes[e.bn.name], [(nodes[c.name], k) for c, k in e.consumers])
                 for name, e in self.edits.items()}
        flow = self.flow.remap(nodes) if self.flow is not None else None
        return Analysis(gm, self.input_shape, self.bns, edits, self.shapes, flow, self.coupling)


class SlimTracer(Tracer):
    """The fx tracer of the pruning engine: channel selections and BatchNorms stay single modules,
    including BatchNorm subclasses with a built-in activation (timm's ``BatchNormAct2d``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, ChannelSelection) or is_plain_or_fused_bn(m)
                or super().is_leaf_module(m, module_qualified_name))


def trace(model: nn.Module) -> GraphModule:
    """``torch.fx`` trace of ``model``; the GraphModule shares the model's submodules."""
    tracer = SlimTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise PruneError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            f"pruning needs a forward without data-dependent Python control flow"
        ) from exc
    gm = GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    for m in gm.modules():
        if type(m) is nn.Module:  # the empty containers fx creates for dotted names
            m.training = model.training
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        gm.input_shape = tuple(shape)
    return gm


def resolve_input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    """``input_shape`` (one sample, e.g. (C, H, W)), else the model's ``input_shape`` attribute."""
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise PruneError(
            f"the input shape of {type(model).__name__} is unknown; pass input_shape=(C, H, W) "
            f"(one sample, without the batch dimension)"
        )
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise PruneError(f"input_shape must be positive sizes of one sample, e.g. (3, 32, 32); got {shape}")
    return shape


class _ShapeRecorder(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # keep errors one line (and skip formatting the graph)
        self.shapes: dict[Node, tuple[int, ...]] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def record_shapes(gm: GraphModule, input_shape: Sequence[int]) -> dict[Node, tuple[int, ...]]:
    """Shape of every tensor-valued node for a zero input of ``(2, *input_shape)`` (eval mode)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PruneError(f"pruning needs a model with exactly one input; {type(gm).__name__} takes "
                         f"{len(placeholders)}")
    ref = next((t for t in itertools.chain(gm.parameters(), gm.buffers()) if t.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    modes = {m: m.training for m in gm.modules()}
    recorder = _ShapeRecorder(gm)
    gm.eval()  # never touch BatchNorm running statistics
    try:
        with torch.no_grad():
            recorder.run(torch.zeros((SHAPE_BATCH, *input_shape), dtype=dtype, device=device))
    except Exception as exc:
        raise PruneError(
            f"the model does not run on an input of shape {tuple(input_shape)} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); pass the input shape it was "
            f"built for"
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    return recorder.shapes


# ----------------------------------------------------------------------------------------------
# op classification


# ----------------------------------------------------------------------------------------------
# the walks


def _find_producer(
    bn: Node, modules: dict[str, nn.Module], counts: dict[str, int], shapes: dict[Node, tuple[int, ...]]
) -> tuple[Node | None, Node | None, str]:
    """(producer to narrow, existing selection to compose, description of what the BN reads)."""
    node = bn.args[0]
    assert isinstance(node, Node)
    channels = shapes[bn][1]
    while True:
        single = len(node.users) == 1
        if node.op == "call_module":
            m = modules[node.target]
            depthwise = isinstance(m, _ConvNd) and not m.transposed and m.groups == m.in_channels > 1
            if is_weight_layer(m) or depthwise:
                out_ch = m.out_channels if isinstance(m, _ConvNd) else m.out_features
                ok_shape = isinstance(m, _ConvNd) or len(shapes.get(node, ())) == 2
                if single and counts[node.target] == 1 and out_ch == channels and ok_shape:
                    return node, None, f"{type(m).__name__} '{node.target}'"
                why = "also used elsewhere" if not single else "cannot be narrowed"
                return None, None, f"{type(m).__name__} '{node.target}' ({why})"
            if isinstance(m, ChannelSelection) and single and counts[node.target] == 1:
                return None, node, f"ChannelSelection '{node.target}'"
        if single and len(node.all_input_nodes) == 1 and is_channelwise(node, modules, shapes):
            node = node.all_input_nodes[0]
            continue
        what = describe(node, modules)
        return None, None, what + ("" if single else ", also used elsewhere")


def _find_consumers(
    bn: Node, modules: dict[str, nn.Module], counts: dict[str, int], shapes: dict[Node, tuple[int, ...]]
) -> tuple[list[tuple[Node, int]], str | None]:
    """(consumers with input features per channel, reason if the BN does not prune alone)."""
    channels = shapes[bn][1]
    consumers: list[tuple[Node, int]] = []
    stack: list[tuple[Node, int]] = [(bn, 1)]
    while stack:
        src, factor = stack.pop()
        src_ndim = len(shapes[src])
        for user in src.users:
            if user.op == "output":
                return [], "its output is a model output"
            if is_shape_query(user, src_ndim):
                continue
            what = describe(user, modules)
            tensor_inputs = [n for n in user.all_input_nodes if n in shapes]
            if tensor_inputs != [src]:
                if user.op == "call_function" and user.target in ADD:
                    return [], f"its output feeds {what}, tying its channels to the other summand"
                if user.op == "call_function" and user.target in CAT:
                    return [], f"its output feeds {what}"
                return [], f"its output is combined with another tensor in {what}"
            if user.op == "call_module":
                m = modules[user.target]
                # stateless modules (a shared ReLU) may be called anywhere; weights may not
                if counts[user.target] > 1 and any(True for _ in m.parameters()):
                    return [], f"its output feeds '{user.target}', which is called more than once"
                layout_ok = None
                if isinstance(m, _ConvNd) and is_weight_layer(m):
                    layout_ok = factor == 1 and m.in_channels == channels and src_ndim >= 3
                elif isinstance(m, nn.Linear) and is_weight_layer(m):
                    layout_ok = src_ndim == 2 and m.in_features == channels * factor
                if layout_ok is not None:
                    if not layout_ok:
                        return [], f"its output reaches {what} in an unexpected layout"
                    consumers.append((user, factor))
                    continue
                if isinstance(m, nn.Flatten) and flattens_shape(shapes[src], shapes.get(user)):
                    stack.append((user, factor * math.prod(shapes[src][2:])))
                    continue
                if isinstance(m, _ConvNd) and m.groups != 1:
                    return [], f"its output feeds the grouped conv '{user.target}' (groups={m.groups})"
            elif is_flatten(user, src, shapes):
                stack.append((user, factor * math.prod(shapes[src][2:])))
                continue
            if is_channelwise(user, modules, shapes):
                stack.append((user, factor))
                continue
            return [], f"its output feeds {what}, which slim cannot prune through"
    return consumers, None


def _check_coupling(coupling: str) -> str:
    if coupling not in COUPLINGS:
        raise PruneError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}")
    return coupling


def analyze(
    model: nn.Module, input_shape: Sequence[int] | None = None, *, coupling: str = "auto"
) -> Analysis:
    """Trace ``model`` and classify every BatchNorm (the GraphModule shares its modules).

    ``coupling`` (``auto``, ``joint``, ``select``) says how BatchNorms whose channels are tied
    together are pruned (:mod:`slimcli.prune.groups`).
    """
    coupling = _check_coupling(coupling)
    shape = resolve_input_shape(model, input_shape)
    gm = trace(model)
    shapes = record_shapes(gm, shape)
    modules = dict(gm.named_modules())
    counts = call_counts(gm)
    flow = channel_flow(gm, shapes, counts, coupling)
    table = flow.table
    members: dict[int, list[str]] = {}
    for name, (_node, ids) in flow.bns.items():
        for r in set(table[ids].tolist()):
            members.setdefault(r, []).append(name)
    group = groups_of(flow)
    analysis = Analysis(gm, shape, BNTable(), shapes={n.name: s for n, s in shapes.items()}, flow=flow,
                        coupling=coupling)
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        name = node.target
        if name in seen:
            continue
        seen.add(name)
        bn = modules[name]
        producer, selection, reads = _find_producer(node, modules, counts, shapes)
        consumers, simple_reason = _find_consumers(node, modules, counts, shapes)
        classes: tuple[int, ...] | None = None
        reason: str | None = None
        if counts[name] > 1:
            reason = f"it is called {counts[name]} times in forward"
        elif not bn.affine:
            reason = "it has no scale γ (affine=False)"
        elif len(shapes.get(node, ())) < 2:
            reason = "its output has no channel dimension"
        elif name not in flow.bns:
            reason = "slim cannot follow its channels through the graph"
        else:
            roots = table[flow.bns[name][1]].tolist()
            why: dict[int, str] = {}
            for r in set(roots):
                if coupling == "select" and len(members[r]) > 1:
                    other = next(m for m in members[r] if m != name)
                    tie = flow.ties.get(r, "an op that combines them")
                    why[r] = (f"its channels are tied to '{other}' by {tie} (--coupling auto or joint prunes "
                              f"them together)")
                elif r in flow.frozen:
                    why[r] = flow.frozen[r]
            if all(r in why for r in roots):  # a tie to another BN explains more than a frozen channel
                reason = next((why[r] for r in roots if "tied to" in why[r]), why[roots[0]])
            else:
                classes = tuple(-1 if r in why else r for r in roots)
        in_group = classes is not None and any(len(members[r]) > 1 for r in set(classes) if r >= 0)
        analysis.bns[name] = BNInfo(
            name=name,
            kind=type(bn).__name__,
            channels=bn.num_features,
            prunable=reason is None,
            reason=reason,
            producer=producer.target if producer is not None and name not in flow.selected else None,
            consumers=tuple(c.target for c, _ in consumers) if reason is None and simple_reason is None
            else (),
            needs_selection=name in flow.selected or selection is not None,
            reads=reads,
            group=group.get(name) if in_group else None,
            classes=classes,
        )
        simple = reason is None and simple_reason is None and not in_group and -1 not in (classes or ())
        if simple:  # the shift folding follows these edits (one BN, channel-wise ops to consumers)
            analysis.edits[name] = Edit(node, consumers)
    removable = {c for b in analysis.bns.values() if b.classes is not None for c in b.classes if c >= 0}
    if removable:
        sets, units = set(), set()
        for node, ids in flow.ids.items():
            roots = frozenset(table[ids].tolist())
            if not roots <= removable:
                continue
            sets.add(tuple(sorted(roots)))
            seen = {int(i) for src in node.all_input_nodes if src in flow.ids for i in flow.ids[src].tolist()}
            if not seen.intersection(ids.tolist()):  # fresh channels: a conv, linear or selection output
                units.add(tuple(sorted(roots)))
        analysis.bns.keep_one = sorted(sets)
        analysis.bns.units = sorted(units)
    # BatchNorms the forward never calls as modules: listed (for reports) but never touched
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and name not in analysis.bns and name:
            why = "it is never called in forward"
            if not is_plain_or_fused_bn(m):
                why = (f"its class {type(m).__name__} overrides forward (slim sees only the functional "
                       f"batch_norm inside it; a subclass with an `act` module is treated as BatchNorm + "
                       f"activation)")
            analysis.bns[name] = BNInfo(name, type(m).__name__, m.num_features, False, why, None, (), False,
                                        "nothing")
    return analysis


def prunable_bns(
    model: nn.Module, example_input_shape: Sequence[int] | None = None, *, coupling: str = "auto"
) -> dict[str, BNInfo]:
    """Every BatchNorm of ``model`` (in graph order) with whether and how it can be pruned.

    ``example_input_shape`` is one sample's shape, e.g. ``(3, 32, 32)``; it defaults to the
    model's ``input_shape`` attribute.
    """
    return analyze(model, example_input_shape, coupling=coupling).bns
