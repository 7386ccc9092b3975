"""Coupled channels: which channels of which BatchNorms must be removed together.

Every tensor in the traced graph gets one *channel id* per entry of its dimension 1. An op
that creates new channels (a conv with ``groups=1``, a linear, a channel selection, the
network input) gives fresh ids; an op that acts on each channel alone (activations, pooling,
BatchNorm, a depthwise conv) passes the ids through; an op that moves channels (concatenation,
``split``/``chunk``, slices along dim 1, flattens) moves the ids with them; and an op that
combines two tensors channel by channel (``+``, ``*``, ``/``) *unites* the ids of the
channels it combines. A union-find over the ids then yields the **classes**: the channels
that exist together or not at all. Removing a class means deleting its position from every
tensor that carries it — the output channels of the convs that produce it, the input columns
of every conv/linear that reads it, the entries of every BatchNorm, depthwise conv and
channel selection on the way.

That is exact (slim model == dense model with the class's BatchNorm outputs zeroed) when:

- every conv/linear that *mixes* channels reads the class as exact zeros once its BatchNorms
  are zeroed (tracked per tensor and channel: a zeroed BatchNorm gives 0, zero-preserving ops
  keep 0, a sum is 0 when both operands are, a product when either is);
- it never reaches the model output, an op slim does not understand (that op *freezes* it,
  with the reason), or the network input;
- it has at least one BatchNorm, whose |γ| score it.

``coupling`` says how BatchNorms that read a shared tensor are treated: ``joint`` unites them
with that tensor (no gather ever, every coupling pruned jointly); ``auto`` does the same but
puts network slimming's channel selection in front of a BatchNorm that reads a residual sum,
a concatenation or the network input (pre-activation ResNets, DenseNets), and in front of
any other BatchNorm reading a shared tensor that the joint analysis leaves frozen; ``select``
puts a selection in front of every BatchNorm that reads a tensor it does not own and refuses
classes shared by several BatchNorms (each BatchNorm prunes alone, the behaviour before
coupled groups).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimcli.prune.ops import (
    ADD,
    CAT,
    MUL,
    POOL_FUNCTIONS,
    POOL_MODULES,
    SHAPE_BATCH,
    describe,
    is_elementwise_module,
    normalise_dims,
)
from slimcli.prune.select import ChannelSelection

COUPLINGS = ("auto", "joint", "select")

# ----------------------------------------------------------------------------------------------
# op tables for the channel flow (what 0 becomes matters: see the module docstring)

#: one-input functions that act on each element alone and map 0 to 0
ZERO_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu,
    F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.softsign, F.hardshrink, F.softshrink, F.tanhshrink,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.abs, torch.neg, torch.square,
    torch.sin, torch.sinh, torch.asin, torch.atan, torch.erf, torch.sign, torch.sgn, torch.expm1,
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, *POOL_FUNCTIONS,
}
ZERO_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "abs", "abs_", "neg", "neg_", "square", "sin", "sign", "contiguous",
    "clone", "float", "double", "half", "bfloat16", "to", "type_as", "detach", "expm1",
}
#: one-input element-wise functions that map 0 to something else (the channel stays, 0 does not)
NONZERO_FUNCTIONS: set[Any] = {
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, torch.cos, torch.cosh, F.logsigmoid,
    torch.erfc, torch.reciprocal, torch.rsqrt, torch.sqrt, torch.log, torch.log1p,
}
NONZERO_METHODS = {"sigmoid", "sigmoid_", "exp", "exp_", "cos", "sqrt", "rsqrt", "reciprocal", "log"}
NONZERO_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
SPATIAL_ZERO_MODULES: tuple[type[nn.Module], ...] = (
    *POOL_MODULES, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
REDUCE = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
CLAMP = {torch.clamp, torch.clip, F.hardtanh}
SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split}
RESHAPE = {torch.reshape, torch.flatten}
RESHAPE_METHODS = {"view", "reshape", "flatten"}
PERMUTE_METHODS = {"permute", "transpose", "transpose_"}
SQUEEZE_METHODS = {"squeeze", "unsqueeze"}
SUBTRACT = {operator.sub, operator.isub, torch.sub}
DIVIDE = {operator.truediv, operator.itruediv, torch.div}


def fused_activation(m: _BatchNorm) -> tuple[bool, str] | None:
    """For a BatchNorm subclass with an activation built in (timm's ``BatchNormAct2d``):
    (does its activation map 0 to 0, its description); ``None`` for a plain BatchNorm."""
    if type(m).forward is _BatchNorm.forward or isinstance(m, nn.SyncBatchNorm):
        return None
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if not isinstance(act, nn.Module):
        return None
    ok = is_elementwise_module(act) and (drop is None or is_elementwise_module(drop))
    return ok, type(act).__name__


def is_plain_or_fused_bn(m: nn.Module) -> bool:
    """A BatchNorm the pruning engine treats as one node: plain, SyncBatchNorm, or with a built-in act."""
    if not isinstance(m, _BatchNorm):
        return False
    return (type(m).forward is _BatchNorm.forward or isinstance(m, nn.SyncBatchNorm)
            or fused_activation(m) is not None)


# ----------------------------------------------------------------------------------------------
# the result


def _find(parent: list[int], i: int) -> int:
    """The root of ``i`` in the union-find ``parent`` (with path compression)."""
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


@dataclass
class Flow:
    """The channel flow of one traced model (see the module docstring)."""

    #: node → raw channel id of every entry of dim 1 (tensors with a channel dimension only)
    ids: dict[Node, Tensor]
    #: raw id → class root (the final union-find, resolved once)
    table: Tensor
    #: root → why the class cannot be removed (first reason found)
    frozen: dict[int, str]
    #: BN name → (its node, raw ids of its output channels)
    bns: dict[str, tuple[Node, Tensor]]
    #: BN names that get a channel selection in front (auto/select)
    selected: set[str]
    #: root → description of the first op that tied two BatchNorms' channels together
    ties: dict[int, str] = field(default_factory=dict)
    #: nodes whose literal channel arguments the surgery must rewrite (slices, splits, reshapes)
    rewrites: dict[Node, str] = field(default_factory=dict)

    def remap(self, nodes: dict[str, Node]) -> Flow:
        """The same flow for a deep copy of the graph (``nodes``: name → copied node)."""
        return Flow({nodes[n.name]: t for n, t in self.ids.items()}, self.table, self.frozen,
                    {k: (nodes[n.name], t) for k, (n, t) in self.bns.items()}, set(self.selected), self.ties,
                    {nodes[n.name]: r for n, r in self.rewrites.items()})


class _Builder:
    def __init__(self, gm: GraphModule, shapes: dict[Node, tuple[int, ...]], counts: dict[str, int],
                 coupling: str, select: set[str] | None = None) -> None:
        self.gm = gm
        self.select = select  # BNs that get a selection (None: the junction rule of select mode)
        self.shapes = shapes
        self.counts = counts
        self.coupling = coupling
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.ids: dict[Node, Tensor] = {}
        self.zero: dict[Node, Tensor] = {}
        self.why_nonzero: dict[Node, str] = {}
        self.pieces: dict[Node, list[tuple[Tensor, Tensor]]] = {}  # split/chunk results
        #: channel shuffles: a view (N, C, …) → (N, g, C/g, …) keeps its channels as a grid of ids
        self.grid: dict[Node, tuple[Tensor, Tensor, bool]] = {}  # ids, zero, transposed
        self.frozen_raw: list[tuple[Tensor, str]] = []
        self.nonzero_uses: list[tuple[Tensor, str]] = []
        self.ties: list[tuple[int, int, str]] = []
        self.bns: dict[str, tuple[Node, Tensor]] = {}
        self.bn_ids: set[int] = set()
        self.selected: set[str] = set()
        self.rewrites: dict[Node, str] = {}

    # -- ids -------------------------------------------------------------------------------
    def fresh(self, n: int) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, i: int) -> int:
        return _find(self.parent, i)

    def unite(self, a: Tensor, b: Tensor, what: str) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                self.ties.append((x, y, what))

    def freeze(self, node: Node | None, reason: str) -> None:
        if node is not None and node in self.ids:
            self.frozen_raw.append((self.ids[node], reason))
        if node is not None and node in self.pieces:
            for ids, _ in self.pieces[node]:
                self.frozen_raw.append((ids, reason))

    def set(self, node: Node, ids: Tensor, zero: Tensor, why: str | None = None) -> None:
        self.ids[node] = ids
        self.zero[node] = zero
        if why is not None:
            self.why_nonzero[node] = why

    def same(self, node: Node, src: Node, *, keeps_zero: bool = True, why: str | None = None) -> None:
        zero = self.zero[src] if keeps_zero else torch.zeros_like(self.zero[src])
        self.set(node, self.ids[src], zero,
                 self.why_nonzero.get(src) if keeps_zero else (why or describe(node, self.modules)))

    def new_channels(self, node: Node, *, frozen: str | None = None) -> None:
        shape = self.shapes.get(node)
        if shape is None or len(shape) < 2:
            return
        ids = self.fresh(shape[1])
        why = f"the output of {describe(node, self.modules)}"
        self.set(node, ids, torch.zeros(shape[1], dtype=torch.bool), why)
        if frozen:
            self.frozen_raw.append((ids, frozen))

    def needs_zero(self, src: Node, consumer: str) -> None:
        """``src`` is read by an op that mixes channels: a removed channel must be exact zeros there."""
        ids, zero = self.ids[src], self.zero[src]
        if bool(zero.all()):
            return
        why = self.why_nonzero.get(src, describe(src, self.modules))
        self.nonzero_uses.append((ids[~zero], f"it reaches {consumer} as {why}, which is not zero when "
                                               f"its BatchNorms are"))

    def unknown(self, node: Node, what: str | None = None) -> None:
        """An op slim cannot prune through: its inputs and outputs keep every channel."""
        what = what or f"{describe(node, self.modules)}, which slim cannot prune through"
        for src in node.all_input_nodes:
            self.freeze(src, f"it feeds {what}")
        self.new_channels(node, frozen=f"it comes from {what}")

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> Flow:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except Exception as exc:  # never crash on an odd graph: that node keeps its channels
                self.unknown(node, f"{describe(node, self.modules)} (analysis failed: {type(exc).__name__})")
        frozen: dict[int, str] = {}
        for ids, reason in [*self.frozen_raw, *self.nonzero_uses]:
            for i in ids.tolist():
                frozen.setdefault(self.find(i), reason)
        ties: dict[int, str] = {}
        for x, _y, what in self.ties:
            ties.setdefault(self.find(x), what)
        table = torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)
        return Flow(self.ids, table, frozen, self.bns, self.selected, ties, self.rewrites)

    def tensor_inputs(self, node: Node) -> list[Node]:
        return [n for n in node.all_input_nodes if n in self.shapes]

    def visit(self, node: Node) -> None:
        if node.op == "placeholder":
            self.new_channels(node, frozen="it is the network input")
        elif node.op == "get_attr":
            self.new_channels(node, frozen=f"it is combined with the tensor '{node.target}' of the model")
        elif node.op == "output":
            for src in node.all_input_nodes:
                self.freeze(src, "it is part of the model output")
        elif node.op == "call_module":
            self.visit_module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self.visit_function(node)

    def visit_module(self, node: Node, m: nn.Module) -> None:
        inputs = self.tensor_inputs(node)
        src = inputs[0] if len(inputs) == 1 and node.args[:1] == (inputs[0],) else None
        if src is None or src not in self.ids:
            if node in self.shapes:
                self.unknown(node)
            return
        if self.counts.get(node.target, 1) > 1 and any(True for _ in m.parameters()):
            self.unknown(node, f"'{node.target}', which is called {self.counts[node.target]} times")
            return
        if isinstance(m, _BatchNorm):
            self.visit_bn(node, m, src)
        elif isinstance(m, ChannelSelection):
            self.freeze(src, f"it is read by the channel selection '{node.target}'")
            self.new_channels(node)
        elif isinstance(m, _ConvNd):
            self.visit_conv(node, m, src)
        elif isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear):
            if len(self.shapes[src]) == 2 and len(self.shapes.get(node, ())) == 2:
                self.needs_zero(src, f"Linear '{node.target}'")
                self.new_channels(node)
            else:
                self.unknown(node, f"Linear '{node.target}' over the last dimension of a "
                                   f"{len(self.shapes[src])}-D tensor")
        elif isinstance(m, nn.Flatten):
            self.visit_reshape(node, src, rewrite=False)
        elif is_elementwise_module(m) or isinstance(m, SPATIAL_ZERO_MODULES):
            if self.keeps_channels(node, src, spatial=isinstance(m, SPATIAL_ZERO_MODULES)):
                self.same(node, src)
            else:
                self.unknown(node)
        elif isinstance(m, NONZERO_MODULES) and self.keeps_channels(node, src):
            self.same(node, src, keeps_zero=False)
        elif isinstance(m, nn.Hardtanh | nn.Threshold) and self.keeps_channels(node, src):
            self.same(node, src, keeps_zero=False)
        else:
            self.unknown(node)

    def keeps_channels(self, node: Node, src: Node, *, spatial: bool = False) -> bool:
        a, b = self.shapes.get(src), self.shapes.get(node)
        if a is None or b is None or a[:2] != b[:2]:
            return False
        return (len(a) >= 3 and len(b) == len(a)) if spatial else a == b

    def visit_bn(self, node: Node, m: _BatchNorm, src: Node) -> None:
        name = node.target
        fused = fused_activation(m)
        if not self.keeps_channels(node, src) or len(self.shapes[src]) < 2:
            self.unknown(node)
            return
        if m.weight is None:  # no γ: a per-channel affine map that keeps its channels, but not 0
            self.same(node, src, keeps_zero=False, why=f"the output of '{name}' (affine=False)")
            return
        wants = (self.coupling == "select" and self.reads_junction(node)) or (
            self.coupling == "auto" and self.junction(node) == "paper") or (
            self.select is not None and name in self.select)
        if wants:
            self.selected.add(name)
            self.freeze(src, f"it is read through the channel selection in front of '{name}'")
            ids = self.fresh(self.shapes[node][1])
        else:
            ids = self.ids[src]
            shared = [i for i in ids.tolist() if i in self.bn_ids]
            if shared:  # the channels of an earlier BN reach this one unchanged in count (depthwise …)
                self.ties.append((shared[0], shared[0], f"{describe(src, self.modules)}"))
        zero = fused is None or fused[0]
        why = None if zero else f"the output of '{name}' (its built-in {fused[1]} maps 0 elsewhere)"
        self.set(node, ids, torch.full((len(ids),), zero, dtype=torch.bool), why)
        self.bns[name] = (node, ids)
        self.bn_ids.update(ids.tolist())

    def reads_junction(self, bn: Node) -> bool:
        """Does ``bn`` read a tensor it does not own: a sum, a concatenation, the input, a shared tensor?"""
        return self.junction(bn) is not None

    def junction(self, bn: Node) -> str | None:
        """What ``bn`` reads when it does not own its input: ``"paper"`` for a residual sum, a
        concatenation or the network input (where network slimming puts a channel selection),
        ``"shared"`` for a tensor also used elsewhere or an op that cannot be narrowed; ``None``
        when it owns it (the walk back through single-use channel-wise ops ends at a conv,
        linear or depthwise conv used by this path alone)."""
        node = bn.args[0]
        while isinstance(node, Node):
            if node.op == "placeholder" or (node.op == "call_function" and node.target in (*ADD, *CAT)):
                return "paper"
            users = [u for u in node.users if u.op != "call_method" or u.target not in ("size", "dim")]
            if len(users) > 1:
                return "shared"
            if node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, _ConvNd) and not m.transposed:
                    return None if (m.groups == 1 or m.groups == m.in_channels) else "shared"
                if isinstance(m, nn.Linear | ChannelSelection):
                    return None
            inputs = self.tensor_inputs(node)
            if len(inputs) != 1 or (node.op == "call_function" and node.target in (*MUL, operator.getitem)):
                return "shared"
            node = inputs[0]
        return "shared"

    def visit_conv(self, node: Node, m: _ConvNd, src: Node) -> None:
        a, b = self.shapes[src], self.shapes.get(node)
        if m.transposed or b is None or len(a) < 3 or a[1] != m.in_channels:
            self.unknown(node)
            return
        if m.groups == 1:
            self.needs_zero(src, f"{type(m).__name__} '{node.target}'")
            self.new_channels(node)
        elif m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
            # depthwise: output channel j reads input channel j // k only
            k = m.out_channels // m.in_channels
            ids = self.ids[src].repeat_interleave(k)
            zero = self.zero[src].repeat_interleave(k) & (m.bias is None)
            why = self.why_nonzero.get(src) if m.bias is None else f"the output of '{node.target}' (its bias)"
            self.set(node, ids, zero, why)
        elif m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0:
            # grouped (ResNeXt, RegNet): every group must keep the same size, so input position j of
            # every group is one class, and output position j of every group another
            g, cin, cout = m.groups, m.in_channels // m.groups, m.out_channels // m.groups
            what = f"the grouped conv '{node.target}' (groups={g}, equal groups)"
            rows = self.ids[src].reshape(g, cin)
            for r in range(1, g):
                self.unite(rows[0], rows[r], what)
            self.needs_zero(src, f"{type(m).__name__} '{node.target}'")
            base = self.fresh(cout)
            ids = base.repeat(g)
            self.set(node, ids, torch.zeros(ids.numel(), dtype=torch.bool), f"the output of {what}")
        else:
            self.unknown(node, f"the grouped conv '{node.target}' (groups={m.groups})")

    # -- functions and methods -------------------------------------------------------------
    def visit_function(self, node: Node) -> None:
        target = node.target
        is_fn, is_method = node.op == "call_function", node.op == "call_method"
        inputs = self.tensor_inputs(node)
        if node not in self.shapes and not (is_fn and target in SPLIT_FUNCTIONS) and not (
                is_method and target in ("split", "chunk", "tensor_split")):
            # a non-tensor result: a size query, a getitem of a split, a tuple
            if is_fn and target is operator.getitem and node.args[0] in self.pieces:
                self.visit_piece(node)
                return
            if (is_method and target in ("size", "dim")) or (is_fn and target is getattr):
                return
            if is_fn and target is operator.getitem and node.args[0] in self.shapes:
                return  # x.shape[0] and friends are handled by their getattr; nothing to track
            for src in inputs:
                self.freeze(src, f"it feeds {describe(node, self.modules)}, which slim cannot prune through")
            return
        if is_fn and target is operator.getitem and node.args[0] in self.pieces:
            self.visit_piece(node)
            return
        if len(inputs) == 1 and inputs[0] in self.grid:
            self.visit_grid(node, inputs[0])
            return
        if not inputs or any(s not in self.ids for s in inputs):
            self.unknown(node)
            return
        src = inputs[0]
        first = node.args[0] if node.args else None
        if len(inputs) == 1 and first is src:
            if self.visit_unary(node, src):
                return
        elif is_fn and target in CAT:
            self.visit_cat(node)
            return
        if len(inputs) == 2 and ((is_fn and target in (*ADD, *MUL)) or (is_method and target in (
                "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"))):
            self.visit_binary(node, inputs)
            return
        if len(inputs) == 1 and ((is_fn and target in (*ADD, *MUL)) or (is_method and target in (
                "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"))):
            self.visit_scalar(node, src)
            return
        self.unknown(node)

    def visit_scalar(self, node: Node, src: Node) -> None:
        """``x + c``, ``c * x``, ``x / c``, ``c - x``: same channels; 0 stays 0 for ×c, /c and ±0."""
        if not self.keeps_channels(node, src):
            self.unknown(node)
            return
        target = node.target if node.op == "call_function" else {
            "add": operator.add, "add_": operator.add, "sub": operator.sub, "sub_": operator.sub,
            "mul": operator.mul, "mul_": operator.mul, "div": operator.truediv, "div_": operator.truediv,
        }[node.target]
        other = [a for a in (*node.args, *node.kwargs.values()) if a is not src]
        const = other[0] if len(other) == 1 and isinstance(other[0], int | float) else None
        if target in ADD or target in SUBTRACT:
            self.same(node, src, keeps_zero=const == 0,
                      why=f"'{node.name}' (it adds a constant)")
        elif target in DIVIDE:
            self.same(node, src, keeps_zero=node.args[0] is src and const is not None)
        elif target in MUL:
            self.same(node, src, keeps_zero=const is not None)
        else:
            self.unknown(node)

    def visit_binary(self, node: Node, inputs: list[Node]) -> None:
        a, b = inputs[0], inputs[1]
        sa, sb, so = self.shapes[a], self.shapes[b], self.shapes[node]
        is_fn = node.op == "call_function"
        kind = (("add" if node.target in ADD else "mul") if is_fn else str(node.target).rstrip("_"))
        if is_fn and node.target in SUBTRACT:
            kind = "sub"
        if is_fn and node.target in DIVIDE:
            kind = "div"
        if len(sa) < 2 or len(sb) < 2 or len(so) < 2 or len(sa) != len(sb) or so[1] != max(sa[1], sb[1]):
            self.unknown(node)
            return
        what = describe(node, self.modules)
        if kind in ("add", "sub"):
            what = f"a residual sum ('{node.name}')"
        elif kind in ("mul", "div"):
            what = f"a product ('{node.name}')"
        za, zb = self.zero[a], self.zero[b]
        if sa[1] == sb[1]:
            self.unite(self.ids[a], self.ids[b], what)
            zero = (za & zb) if kind in ("add", "sub") else (za | zb) if kind == "mul" else za
            why = self.why_nonzero.get(a if not bool(za.all()) else b)
            self.set(node, self.ids[a], zero, why)
            return
        # one operand broadcast over channels (a spatial gate (N, 1, H, W)): it couples every channel
        wide, narrow = (a, b) if sa[1] > sb[1] else (b, a)
        if self.shapes[narrow][1] != 1:
            self.unknown(node)
            return
        self.freeze(narrow, f"it is broadcast over the channels of another tensor in {what}")
        zw, zn = self.zero[wide], self.zero[narrow]
        if kind == "mul":
            zero = zw | bool(zn.all())
        elif kind == "div":
            zero = zw if wide is a else torch.zeros_like(zw)
        else:
            zero = zw & bool(zn.all())
        self.set(node, self.ids[wide], zero, self.why_nonzero.get(wide) or f"the output of {what}")

    def visit_cat(self, node: Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if (node.target is torch.stack or not isinstance(tensors, list | tuple) or not isinstance(dim, int)
                or any(t not in self.ids for t in tensors) or dim % len(self.shapes[node]) != 1):
            self.unknown(node)
            return
        ids = torch.cat([self.ids[t] for t in tensors])
        zero = torch.cat([self.zero[t] for t in tensors])
        why = next((self.why_nonzero[t] for t in tensors if t in self.why_nonzero), None)
        self.set(node, ids, zero, why)

    def visit_unary(self, node: Node, src: Node) -> bool:
        """One-input ops on ``src``; False when the op is not a one-input op we know."""
        target, is_fn = node.target, node.op == "call_function"
        sa, so = self.shapes[src], self.shapes.get(node)
        if (is_fn and target in ZERO_FUNCTIONS) or (not is_fn and target in ZERO_METHODS):
            if so is not None and sa[:2] == so[:2] and (len(so) == len(sa)):
                self.same(node, src)
            else:
                self.unknown(node)
            return True
        if (is_fn and target in NONZERO_FUNCTIONS) or (not is_fn and target in NONZERO_METHODS):
            if so == sa:
                self.same(node, src, keeps_zero=False)
            else:
                self.unknown(node)
            return True
        if (is_fn and target in CLAMP) or (not is_fn and target in ("clamp", "clip", "clamp_", "clip_")):
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min", node.kwargs.get("min_val"))
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max", node.kwargs.get("max_val"))
            if target is F.hardtanh:
                lo = -1.0 if lo is None else lo
                hi = 1.0 if hi is None else hi
            ok = all(v is None or isinstance(v, int | float) for v in (lo, hi))
            keeps = ok and (lo is None or lo <= 0) and (hi is None or hi >= 0)
            if so == sa and ok:
                self.same(node, src, keeps_zero=keeps)
            else:
                self.unknown(node)
            return True
        if (is_fn and target in REDUCE) or (not is_fn and target in REDUCE_METHODS):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = normalise_dims(dim, len(sa))
            if dims and all(d >= 2 for d in dims) and so is not None and so[:2] == sa[:2]:
                keeps = (REDUCE.get(target, target) if is_fn else target) in ("mean", "sum", "amax", "amin")
                self.same(node, src, keeps_zero=keeps)
            else:
                self.unknown(node)
            return True
        if is_fn and target is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
            zero_pad = mode == "constant" and value in (0, 0.0, None)
            if not isinstance(pad, list | tuple) or so is None or not all(isinstance(p, int) for p in pad):
                self.unknown(node)
            elif len(pad) <= 2 * (len(sa) - 2) and so[:2] == sa[:2]:  # spatial padding only
                self.same(node, src, keeps_zero=zero_pad)
            elif len(pad) == 2 * (len(sa) - 1) and zero_pad and min(pad[-2:]) >= 0 and so[0] == sa[0]:
                # zero channels added around the input (the option-A shortcut of CIFAR ResNets): the
                # pad amounts stay, so the added channels stay too (frozen), exact zeros
                before, after = pad[-2], pad[-1]
                ids = torch.cat([self.fresh(before), self.ids[src], self.fresh(after)])
                zero = torch.cat([torch.ones(before, dtype=torch.bool), self.zero[src],
                                  torch.ones(after, dtype=torch.bool)])
                self.frozen_raw.append((torch.cat([ids[:before], ids[before + sa[1]:]]),
                                        f"it is a zero channel added by {describe(node, self.modules)}"))
                self.set(node, ids, zero, self.why_nonzero.get(src))
            else:
                self.unknown(node)
            return True
        if (is_fn and target in RESHAPE) or (not is_fn and target in RESHAPE_METHODS):
            self.visit_reshape(node, src, rewrite=True)
            return True
        if target in PERMUTE_METHODS or target in (torch.permute, torch.transpose):
            if self.keeps_channel_dims(node, sa, so):
                self.same(node, src)
            else:
                self.unknown(node, f"{describe(node, self.modules)}, which moves the channel dimension")
            return True
        if target in SQUEEZE_METHODS or target in (torch.squeeze, torch.unsqueeze):
            if so is not None and len(so) >= 2 and so[:2] == sa[:2]:
                self.same(node, src)
            else:
                self.unknown(node)
            return True
        if is_fn and target is operator.getitem:
            self.visit_slice(node, src)
            return True
        if target in SPLIT_FUNCTIONS or target in ("split", "chunk", "tensor_split"):
            self.visit_split(node, src)
            return True
        return False

    @staticmethod
    def keeps_channel_dims(node: Node, sa: tuple[int, ...], so: tuple[int, ...] | None) -> bool:
        """A permute/transpose that leaves dims 0 and 1 where they are."""
        if so is None or so[:2] != sa[:2]:
            return False
        rest = [a for a in node.args[1:]]
        if len(rest) == 1 and isinstance(rest[0], list | tuple):
            rest = list(rest[0])
        if not rest:
            rest = [node.kwargs.get("dims", node.kwargs.get("dim0")), node.kwargs.get("dim1")]
        dims = normalise_dims([d for d in rest if d is not None], len(sa))
        if dims is None:
            return False
        if node.target in ("transpose", "transpose_") or node.target is torch.transpose:
            return len(dims) == 2 and all(d >= 2 for d in dims)
        return len(dims) == len(sa) and dims[:2] == [0, 1]  # permute

    def visit_grid(self, node: Node, src: Node) -> None:
        """The middle of a channel shuffle: transpose the grid, or view it back to (N, C, …)."""
        ids, zero, flipped = self.grid[src]
        sa, so = self.shapes[src], self.shapes.get(node)
        target = node.target
        if node.op == "call_method" and target in ("contiguous", "clone") and so == sa:
            self.grid[node] = (ids, zero, flipped)
            return
        if (target in ("transpose", "transpose_") or target is torch.transpose) and so is not None:
            dims = normalise_dims([d for d in node.args[1:]], len(sa))
            if dims is not None and sorted(dims) == [1, 2]:
                self.grid[node] = (ids.t(), zero.t(), not flipped)
                return
        if (target in RESHAPE_METHODS or target in RESHAPE) and so is not None and len(so) == len(sa) - 1 \
                and so[0] == sa[0] and so[1] == sa[1] * sa[2] and so[2:] == sa[3:]:
            self.set(node, ids.reshape(-1), zero.reshape(-1), self.why_nonzero.get(src))
            self.rewrites[node] = "reshape"
            return
        self.grid_unknown(node, src)

    def grid_unknown(self, node: Node, src: Node) -> None:
        ids, _, _ = self.grid[src]
        what = f"it feeds {describe(node, self.modules)}, which regroups channels"
        self.frozen_raw.append((ids.reshape(-1), what))
        self.new_channels(node, frozen=f"it comes from {describe(node, self.modules)}")

    def visit_reshape(self, node: Node, src: Node, *, rewrite: bool) -> None:
        """Flattens (N, C, *S) → (N, C·S), reshapes that keep (N, C), and unflattens (N, C·S) → (N, C, …)."""
        sa, so = self.shapes[src], self.shapes.get(node)
        ids, zero = self.ids[src], self.zero[src]
        if (so is not None and len(so) == len(sa) + 1 and len(sa) >= 3 and so[0] == sa[0]
                and so[1] * so[2] == sa[1] and so[3:] == sa[2:] and so[1] > 1):
            # (N, C, …) → (N, g, C/g, …): the first view of a channel shuffle. Channel j of every group
            # goes together, so that the groups keep equal sizes and the shuffle stays a shuffle.
            g, cg = so[1], so[2]
            grid, zgrid = ids.reshape(g, cg), zero.reshape(g, cg)
            for r in range(1, g):
                self.unite(grid[0], grid[r], f"the channel shuffle at '{node.name}' (groups={g})")
            self.grid[node] = (grid, zgrid, False)
            self.rewrites[node] = "grid"
            return
        if so is None or len(so) < 2 or sa[0] != so[0] or so[0] != SHAPE_BATCH:
            self.unknown(node, f"{describe(node, self.modules)}, which reshapes across the batch or channels")
            return
        if len(so) == 2 and len(sa) > 2 and so[1] == math.prod(sa[1:]):  # flatten
            per = math.prod(sa[2:])
            self.set(node, ids.repeat_interleave(per), zero.repeat_interleave(per), self.why_nonzero.get(src))
            if rewrite:
                self.rewrites[node] = "flatten"
            return
        if so[1] == sa[1] and math.prod(so) == math.prod(sa):  # keeps channels, reshapes the rest
            self.same(node, src)
            if rewrite:
                self.rewrites[node] = "reshape"
            return
        if len(sa) == 2 and len(so) > 2 and sa[1] == math.prod(so[1:]):  # unflatten: constant blocks
            per = math.prod(so[2:])
            blocks, zblocks = ids.reshape(so[1], per), zero.reshape(so[1], per)
            if bool((blocks == blocks[:, :1]).all()) and bool((zblocks == zblocks[:, :1]).all()):
                self.set(node, blocks[:, 0].clone(), zblocks[:, 0].clone(), self.why_nonzero.get(src))
                if rewrite:
                    self.rewrites[node] = "reshape"
                return
        self.unknown(node, f"{describe(node, self.modules)}, which regroups channels")

    def visit_slice(self, node: Node, src: Node) -> None:
        index = node.args[1]
        sa, so = self.shapes[src], self.shapes.get(node)
        items = list(index) if isinstance(index, tuple) else [index]
        if (len(items) >= 2 and items[0] == slice(None) and isinstance(items[1], slice)
                and all(isinstance(v, int | None) for v in (items[1].start, items[1].stop, items[1].step))
                and items[1].step in (None, 1) and Ellipsis not in items[2:]
                and all(isinstance(i, slice) or i is None for i in items[2:])
                and so is not None and len(so) == len(sa)):
            rng = range(sa[1])[items[1]]
            sel = torch.tensor(list(rng), dtype=torch.long)
            if so[1] != len(sel):
                self.unknown(node)
                return
            self.set(node, self.ids[src][sel], self.zero[src][sel], self.why_nonzero.get(src))
            if len(sel) != sa[1]:
                self.rewrites[node] = "slice"
            return
        if (len(items) >= 1 and all(i == slice(None) or i is Ellipsis for i in items[:2])
                and so is not None and so[:2] == sa[:2] and Ellipsis not in items[:1]):
            self.same(node, src)
            return
        self.unknown(node, f"{describe(node, self.modules)}, an indexing slim cannot follow")

    def visit_split(self, node: Node, src: Node) -> None:
        sa = self.shapes[src]
        args = list(node.args[1:])
        dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
        arg = args[0] if args else node.kwargs.get("split_size_or_sections", node.kwargs.get(
            "chunks", node.kwargs.get("split_size", node.kwargs.get("sections"))))
        name = node.target if isinstance(node.target, str) else node.target.__name__
        if not isinstance(dim, int) or dim % len(sa) != 1:
            self.unknown(node, f"{describe(node, self.modules)}, a split along another dimension")
            return
        c = sa[1]
        try:
            if name == "chunk" and isinstance(arg, int):
                pieces = [p.numel() for p in torch.arange(c).chunk(arg)]
            elif name == "split" and isinstance(arg, int | list | tuple):
                pieces = [p.numel() for p in torch.arange(c).split(arg)]
            else:
                raise ValueError(name)
        except (ValueError, RuntimeError, TypeError):
            self.unknown(node)
            return
        ids, zero = self.ids[src], self.zero[src]
        self.pieces[node] = list(zip(ids.split(pieces), zero.split(pieces), strict=True))
        self.why_nonzero[node] = self.why_nonzero.get(src, "")
        self.rewrites[node] = "split"

    def visit_piece(self, node: Node) -> None:
        parts = self.pieces[node.args[0]]
        i = node.args[1]
        if not isinstance(i, int) or not -len(parts) <= i < len(parts) or node not in self.shapes:
            self.freeze(node.args[0], f"{describe(node, self.modules)} picks pieces slim cannot follow")
            return
        ids, zero = parts[i]
        self.set(node, ids, zero, self.why_nonzero.get(node.args[0]) or None)


def channel_flow(gm: GraphModule, shapes: dict[Node, tuple[int, ...]], counts: dict[str, int],
                 coupling: str = "auto") -> Flow:
    """The channel ids, classes and frozen classes of ``gm`` (see the module docstring)."""
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}")
    if coupling != "auto":
        return _Builder(gm, shapes, counts, coupling).run()
    # auto: joint groups, with network slimming's selections in front of BatchNorms that read a
    # residual sum, a concatenation or the input; then a selection also in front of any other
    # BatchNorm reading a shared tensor that the first pass cannot prune at all
    joint = _Builder(gm, shapes, counts, "auto")
    flow = joint.run()
    stuck = {name for name, (node, ids) in flow.bns.items()
             if all(int(r) in flow.frozen for r in flow.table[ids].tolist()) and joint.reads_junction(node)}
    if not stuck:
        return flow
    return _Builder(gm, shapes, counts, "auto", select=stuck | flow.selected).run()


def groups_of(flow: Flow) -> dict[str, str]:
    """BN name → the first BatchNorm (graph order) of the BatchNorms it shares classes with, transitively."""
    names = list(flow.bns)
    parent = list(range(len(names)))
    owner: dict[int, int] = {}  # class root → index of the first BN that has it
    for i, name in enumerate(names):
        for r in set(flow.table[flow.bns[name][1]].tolist()):
            if r in owner:
                a, b = _find(parent, i), _find(parent, owner[r])
                parent[max(a, b)] = min(a, b)  # the earlier BN stays the root
            else:
                owner[r] = i
    return {name: names[_find(parent, i)] for i, name in enumerate(names)}


__all__ = ["COUPLINGS", "Flow", "channel_flow", "fused_activation", "groups_of", "is_plain_or_fused_bn"]
