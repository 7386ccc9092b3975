"""Graph analysis: which BatchNorms can lose channels, and what has to change with them.

The model is traced with torch.fx and run once on a small zero input to record every
tensor's shape. For each BatchNorm the analysis then walks

- **backwards** from its input through channel-wise ops to the *producer*: a conv (groups 1)
  or a linear whose output goes nowhere else can simply lose output channels; anything else
  (a residual sum, a concatenation, the network input, a tensor used twice) gets a
  :class:`~slimcli.prune.select.ChannelSelection` in front of the BatchNorm;
- **forwards** from its output through zero-preserving channel-wise ops (ReLU-like
  activations, pooling, dropout, identity, flatten) to the *consumers*: convs (groups 1) and
  linears that lose the matching input channels (``H·W`` input features per channel after a
  flatten).

A BatchNorm is prunable only when every forward path ends in a consumer. Anything else —
an add, a concatenation, a product, the model output, an op the walk does not know — ties
its channels to something that cannot shrink with it, so it is reported as not prunable
with the reason. The rules are deliberately conservative: a wrong "prunable" would silently
change the network; a wrong "not prunable" only keeps a few channels.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node, Tracer
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimcli.errors import PruneError
from slimcli.prune.select import ChannelSelection

#: Batch size of the shape-recording run: 2, so that a reshape to (N, -1) and one that
#: hard-codes the batch (or folds it into features) can be told apart.
_BATCH = 2

# Channel-wise ops that map 0 to 0: a channel the BatchNorm zeroes stays zero through them,
# so removing it is exact. (Sigmoid, softplus, … map 0 to a constant: not in these lists.)
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu,
    F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
}
_POOL_FUNCTIONS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone"}
_REDUCE_FUNCTIONS: set[Any] = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_FLATTEN_FUNCTIONS: set[Any] = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_MUL = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack}


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "channels": self.channels, "prunable": self.prunable,
            "reason": self.reason, "producer": self.producer, "consumers": list(self.consumers),
            "needs_selection": self.needs_selection, "reads": self.reads,
        }


@dataclass
class Edit:
    """The graph nodes that change when one prunable BatchNorm loses channels."""

    bn: Node
    producer: Node | None  # conv/linear losing output channels
    selection: Node | None  # an existing ChannelSelection read only by this BatchNorm
    consumers: list[tuple[Node, int]]  # (conv/linear node, input features per channel)
    flattens: list[Node]  # view/reshape flattens on the way, rewritten as torch.flatten(x, 1)


@dataclass
class Analysis:
    """A traced model (sharing the analysed model's modules), its BatchNorms and their edits."""

    gm: GraphModule
    input_shape: tuple[int, ...]
    bns: dict[str, BNInfo]
    edits: dict[str, Edit] = field(default_factory=dict)
    #: node name → tensor shape in the zero-input run (batch 2)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

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

        def same(n: Node | None) -> Node | None:
            return None if n is None else nodes[n.name]

        edits = {
            name: Edit(nodes[e.bn.name], same(e.producer), same(e.selection),
                       [(nodes[c.name], k) for c, k in e.consumers], [nodes[f.name] for f in e.flattens])
            for name, e in self.edits.items()
        }
        return Analysis(gm, self.input_shape, self.bns, edits, self.shapes)


class SlimTracer(Tracer):
    """The fx tracer of the pruning engine: channel selections stay single modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ChannelSelection) or super().is_leaf_module(m, module_qualified_name)


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
            recorder.run(torch.zeros((_BATCH, *input_shape), dtype=dtype, device=device))
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


def _call_counts(gm: GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _describe(node: Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "placeholder":
        return f"the network input '{node.name}'"
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        fn = getattr(node.target, "__name__", str(node.target))
        if node.target in _ADD:
            return f"a residual sum ('{node.name}')"
        if node.target in _CAT:
            return f"a concatenation ('{node.name}')"
        return f"{fn} ('{node.name}')"
    if node.op == "call_method":
        return f".{node.target}() ('{node.name}')"
    return f"{node.op} '{node.name}'"


def _is_weight_layer(m: nn.Module) -> bool:
    """Convs (not transposed, groups 1) and linears: the layers whose channels can be sliced."""
    if isinstance(m, _ConvNd):
        return not m.transposed and m.groups == 1
    return isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear)


def _is_elementwise_module(m: nn.Module) -> bool:
    if isinstance(m, nn.Hardtanh):  # includes ReLU6; zero-preserving when 0 lies in its range
        return m.min_val <= 0 <= m.max_val
    return isinstance(m, _ELEMENTWISE_MODULES)


def _dims(arg: Any, ndim: int) -> list[int] | None:
    if isinstance(arg, int):
        arg = [arg]
    if not isinstance(arg, (list, tuple)) or not all(isinstance(d, int) for d in arg):
        return None
    return [d % ndim for d in arg]


def _reduces_spatial_only(node: Node, ndim: int) -> bool:
    """A mean/sum/amax (or squeeze) over dimensions ≥ 2 only: batch and channels survive."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = _dims(dim, ndim)
    return bool(dims) and all(d >= 2 for d in dims)  # type: ignore[union-attr]


def _is_shape_query(user: Node, src_ndim: int) -> bool:
    """``x.size(0)``, ``x.shape[0]``, ``x.dim()``: reads nothing that pruning changes."""
    if user.op == "call_method" and user.target == "dim":
        return True
    whole = (user.op == "call_method" and user.target == "size" and len(user.args) == 1
             and "dim" not in user.kwargs) or (
        user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",))
    if whole:  # only its batch entry may be read
        return all(u.op == "call_function" and u.target is operator.getitem
                   and isinstance(u.args[1], int) and u.args[1] % src_ndim == 0 for u in user.users)
    if user.op == "call_method" and user.target == "size":
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        return isinstance(dim, int) and dim % src_ndim == 0
    return False


def _is_flatten(user: Node, src: Node, shapes: dict[Node, tuple[int, ...]]) -> bool:
    """Does ``user`` turn (N, C, *S) into (N, C·prod(S)) (or leave a 2-D (N, F) alone)?"""
    if user.op == "call_module":
        return False  # nn.Flatten is checked by the caller (it needs the module)
    is_candidate = (user.op == "call_function" and user.target in _FLATTEN_FUNCTIONS) or (
        user.op == "call_method" and user.target in _FLATTEN_METHODS)
    if not is_candidate or user.args[0] is not src:
        return False
    return _flattens_shape(shapes.get(src), shapes.get(user))


def _flattens_shape(src: tuple[int, ...] | None, out: tuple[int, ...] | None) -> bool:
    if src is None or out is None or len(src) < 2 or len(out) != 2:
        return False
    return src[0] == out[0] == _BATCH and out[1] == math.prod(src[1:])


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
            if _is_weight_layer(m):
                out_ch = m.out_channels if isinstance(m, _ConvNd) else m.out_features
                ok_shape = isinstance(m, _ConvNd) or len(shapes.get(node, ())) == 2
                if single and counts[node.target] == 1 and out_ch == channels and ok_shape:
                    return node, None, f"{type(m).__name__} '{node.target}'"
                why = "also used elsewhere" if not single else "cannot be narrowed"
                return None, None, f"{type(m).__name__} '{node.target}' ({why})"
            if isinstance(m, ChannelSelection) and single and counts[node.target] == 1:
                return None, node, f"ChannelSelection '{node.target}'"
        if single and len(node.all_input_nodes) == 1 and _is_channelwise(node, modules, shapes):
            node = node.all_input_nodes[0]
            continue
        what = _describe(node, modules)
        return None, None, what + ("" if single else ", also used elsewhere")


def _is_channelwise(node: Node, modules: dict[str, nn.Module], shapes: dict[Node, tuple[int, ...]]) -> bool:
    """A single-input op that keeps dim 1 as channels and acts on each channel alone, 0 → 0."""
    if node not in shapes or len(node.all_input_nodes) != 1:
        return False
    src = node.all_input_nodes[0]
    if src not in shapes or node.args[:1] != (src,):
        return False
    ndim = len(shapes[src])
    if shapes[node][:2] != shapes[src][:2]:
        return False
    if node.op == "call_module":
        m = modules[node.target]
        return _is_elementwise_module(m) or (isinstance(m, _POOL_MODULES) and ndim >= 3)
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return True
        if node.target in _POOL_FUNCTIONS:
            return ndim >= 3
        if node.target in _REDUCE_FUNCTIONS:
            return ndim >= 3 and _reduces_spatial_only(node, ndim)
        return False
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return True
        if node.target in _REDUCE_METHODS or node.target == "squeeze":
            return ndim >= 3 and _reduces_spatial_only(node, ndim)
    return False


def _find_consumers(
    bn: Node, modules: dict[str, nn.Module], counts: dict[str, int], shapes: dict[Node, tuple[int, ...]]
) -> tuple[list[tuple[Node, int]], list[Node], str | None]:
    """(consumers with input features per channel, flattens to rewrite, reason if not prunable)."""
    channels = shapes[bn][1]
    consumers: list[tuple[Node, int]] = []
    flattens: list[Node] = []
    stack: list[tuple[Node, int]] = [(bn, 1)]
    while stack:
        src, factor = stack.pop()
        src_ndim = len(shapes[src])
        for user in src.users:
            if user.op == "output":
                return [], [], "its output is a model output"
            if _is_shape_query(user, src_ndim):
                continue
            what = _describe(user, modules)
            tensor_inputs = [n for n in user.all_input_nodes if n in shapes]
            if tensor_inputs != [src]:
                if user.op == "call_function" and user.target in _ADD:
                    return [], [], f"its output feeds {what}, tying its channels to the other summand"
                if user.op == "call_function" and user.target in _CAT:
                    return [], [], f"its output feeds {what}"
                return [], [], f"its output is combined with another tensor in {what}"
            if user.op == "call_module":
                m = modules[user.target]
                # stateless modules (a shared ReLU) may be called anywhere; weights may not
                if counts[user.target] > 1 and any(True for _ in m.parameters()):
                    return [], [], f"its output feeds '{user.target}', which is called more than once"
                layout_ok = None
                if isinstance(m, _ConvNd) and _is_weight_layer(m):
                    layout_ok = factor == 1 and m.in_channels == channels and src_ndim >= 3
                elif isinstance(m, nn.Linear) and _is_weight_layer(m):
                    layout_ok = src_ndim == 2 and m.in_features == channels * factor
                if layout_ok is not None:
                    if not layout_ok:
                        return [], [], f"its output reaches {what} in an unexpected layout"
                    consumers.append((user, factor))
                    continue
                if isinstance(m, nn.Flatten) and _flattens_shape(shapes[src], shapes.get(user)):
                    stack.append((user, factor * math.prod(shapes[src][2:])))
                    continue
                if isinstance(m, _ConvNd) and m.groups != 1:
                    return [], [], f"its output feeds the grouped conv '{user.target}' (groups={m.groups})"
            elif _is_flatten(user, src, shapes):
                flattens.append(user)
                stack.append((user, factor * math.prod(shapes[src][2:])))
                continue
            if _is_channelwise(user, modules, shapes):
                stack.append((user, factor))
                continue
            return [], [], f"its output feeds {what}, which slim cannot prune through"
    return consumers, flattens, None


def analyze(model: nn.Module, input_shape: Sequence[int] | None = None) -> Analysis:
    """Trace ``model`` and classify every BatchNorm (the GraphModule shares its modules)."""
    shape = resolve_input_shape(model, input_shape)
    gm = trace(model)
    shapes = record_shapes(gm, shape)
    modules = dict(gm.named_modules())
    counts = _call_counts(gm)
    analysis = Analysis(gm, shape, {}, shapes={n.name: s for n, s in shapes.items()})
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
        consumers, flattens, reason = _find_consumers(node, modules, counts, shapes)
        if counts[name] > 1:
            reason = f"it is called {counts[name]} times in forward"
        elif not bn.affine:
            reason = "it has no scale γ (affine=False)"
        elif len(shapes.get(node, ())) < 2:
            reason = "its output has no channel dimension"
        analysis.bns[name] = BNInfo(
            name=name,
            kind=type(bn).__name__,
            channels=bn.num_features,
            prunable=reason is None,
            reason=reason,
            producer=producer.target if producer is not None else None,
            consumers=tuple(c.target for c, _ in consumers) if reason is None else (),
            needs_selection=producer is None,
            reads=reads,
        )
        if reason is None:
            analysis.edits[name] = Edit(node, producer, selection, consumers, flattens)
    # BatchNorms the forward never calls: listed (for reports) but never touched
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and name not in analysis.bns and name:
            analysis.bns[name] = BNInfo(name, type(m).__name__, m.num_features, False,
                                        "it is never called in forward", None, (), False, "nothing")
    return analysis


def prunable_bns(model: nn.Module, example_input_shape: Sequence[int] | None = None) -> dict[str, BNInfo]:
    """Every BatchNorm of ``model`` (in graph order) with whether and how it can be pruned.

    ``example_input_shape`` is one sample's shape, e.g. ``(3, 32, 32)``; it defaults to the
    model's ``input_shape`` attribute.
    """
    return analyze(model, example_input_shape).bns
