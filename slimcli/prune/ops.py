"""Op tables and node classifiers shared by the graph analysis and the shift folding.

What an fx node *is* for pruning: a weight layer whose channels can be sliced, a channel-wise
op that maps 0 to 0 (so a zeroed channel stays zero), a pooling or spatial reduction, a
flatten to a linear, a shape query that reads nothing pruning changes, or one of the ops that
tie channels together (sums, products, concatenations). :mod:`slimcli.prune.graph` walks the
graph with these; :mod:`slimcli.prune.fold` adds which ops carry a *constant* channel through.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.modules.conv import _ConvNd

#: Batch size of the shape-recording run: 2, so that a reshape to (N, -1) and one that
#: hard-codes the batch (or folds it into features) can be told apart.
SHAPE_BATCH = 2

# Channel-wise ops that map 0 to 0: a channel the BatchNorm zeroes stays zero through them,
# so removing it is exact. (Sigmoid, softplus, … map 0 to a constant: not in these lists.)
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)
POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu,
    F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
}
POOL_FUNCTIONS: set[Any] = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous", "clone"}
REDUCE_FUNCTIONS: set[Any] = {torch.mean, torch.sum, torch.amax}
REDUCE_METHODS = {"mean", "sum", "amax"}
FLATTEN_FUNCTIONS: set[Any] = {torch.flatten, torch.reshape}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
MUL = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div}
CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack}


#: sums without subtraction, and channel concatenations (not ``stack``): where a constant
#: channel's value can be followed exactly (used by the shift folding)
SUM: set[Any] = {operator.add, operator.iadd, torch.add}
CONCAT: set[Any] = {torch.cat, torch.concat, torch.concatenate}
#: ops that pass a constant channel through unchanged (eval mode): identity, dropout, pooling
#: (max and average over a constant), spatial mean / max, copies
DROPOUT_FUNCTIONS: set[Any] = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
AVG_POOL_FUNCTIONS: set[Any] = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
CONSTANT_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, *POOL_MODULES,
)
CONSTANT_KEEPING_FUNCTIONS: set[Any] = {*DROPOUT_FUNCTIONS, torch.mean, torch.amax, *POOL_FUNCTIONS}
CONSTANT_KEEPING_METHODS = {"contiguous", "clone", "mean", "amax", "squeeze"}


def call_counts(gm: GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def describe(node: Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "placeholder":
        return f"the network input '{node.name}'"
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        fn = getattr(node.target, "__name__", str(node.target))
        if node.target in ADD:
            return f"a residual sum ('{node.name}')"
        if node.target in CAT:
            return f"a concatenation ('{node.name}')"
        return f"{fn} ('{node.name}')"
    if node.op == "call_method":
        return f".{node.target}() ('{node.name}')"
    return f"{node.op} '{node.name}'"


def is_weight_layer(m: nn.Module) -> bool:
    """Convs (not transposed, groups 1) and linears: the layers whose channels can be sliced."""
    if isinstance(m, _ConvNd):
        return not m.transposed and m.groups == 1
    return isinstance(m, nn.Linear) and not isinstance(m, nn.LazyLinear)


def is_elementwise_module(m: nn.Module) -> bool:
    if isinstance(m, nn.Hardtanh):  # includes ReLU6; zero-preserving when 0 lies in its range
        return m.min_val <= 0 <= m.max_val
    return isinstance(m, ELEMENTWISE_MODULES)


def normalise_dims(arg: Any, ndim: int) -> list[int] | None:
    if isinstance(arg, int):
        arg = [arg]
    if not isinstance(arg, (list, tuple)) or not all(isinstance(d, int) for d in arg):
        return None
    return [d % ndim for d in arg]


def reduces_spatial_only(node: Node, ndim: int) -> bool:
    """A mean/sum/amax (or squeeze) over dimensions ≥ 2 only: batch and channels survive."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = normalise_dims(dim, ndim)
    return bool(dims) and all(d >= 2 for d in dims)  # type: ignore[union-attr]


def is_shape_query(user: Node, src_ndim: int) -> bool:
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


def is_flatten(user: Node, src: Node, shapes: dict[Node, tuple[int, ...]]) -> bool:
    """Does ``user`` turn (N, C, *S) into (N, C·prod(S)) (or leave a 2-D (N, F) alone)?"""
    if user.op == "call_module":
        return False  # nn.Flatten is checked by the caller (it needs the module)
    is_candidate = (user.op == "call_function" and user.target in FLATTEN_FUNCTIONS) or (
        user.op == "call_method" and user.target in FLATTEN_METHODS)
    if not is_candidate or user.args[0] is not src:
        return False
    return flattens_shape(shapes.get(src), shapes.get(user))


def flattens_shape(src: tuple[int, ...] | None, out: tuple[int, ...] | None) -> bool:
    if src is None or out is None or len(src) < 2 or len(out) != 2:
        return False
    return src[0] == out[0] == SHAPE_BATCH and out[1] == math.prod(src[1:])


def is_channelwise(node: Node, modules: dict[str, nn.Module], shapes: dict[Node, tuple[int, ...]]) -> bool:
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
        return is_elementwise_module(m) or (isinstance(m, POOL_MODULES) and ndim >= 3)
    if node.op == "call_function":
        if node.target in ELEMENTWISE_FUNCTIONS:
            return True
        if node.target in POOL_FUNCTIONS:
            return ndim >= 3
        if node.target in REDUCE_FUNCTIONS:
            return ndim >= 3 and reduces_spatial_only(node, ndim)
        return False
    if node.op == "call_method":
        if node.target in ELEMENTWISE_METHODS:
            return True
        if node.target in REDUCE_METHODS or node.target == "squeeze":
            return ndim >= 3 and reduces_spatial_only(node, ndim)
    return False


__all__ = [
    "ADD",
    "AVG_POOL_FUNCTIONS",
    "CAT",
    "CONCAT",
    "CONSTANT_KEEPING_FUNCTIONS",
    "CONSTANT_KEEPING_METHODS",
    "CONSTANT_KEEPING_MODULES",
    "DROPOUT_FUNCTIONS",
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS",
    "ELEMENTWISE_MODULES",
    "FLATTEN_FUNCTIONS",
    "FLATTEN_METHODS",
    "MUL",
    "POOL_FUNCTIONS",
    "POOL_MODULES",
    "REDUCE_FUNCTIONS",
    "REDUCE_METHODS",
    "SHAPE_BATCH",
    "SUM",
    "call_counts",
    "describe",
    "flattens_shape",
    "is_channelwise",
    "is_elementwise_module",
    "is_flatten",
    "is_shape_query",
    "is_weight_layer",
    "normalise_dims",
    "reduces_spatial_only",
]
