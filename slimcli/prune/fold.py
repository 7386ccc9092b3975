"""Opt-in folding of the pruned channels' BatchNorm shift β into the next layer.

The default semantics of pruning is the paper's: a removed channel outputs zero (γ and β
zeroed, :func:`~slimcli.prune.masked_dense`). But a channel with γ ≈ 0 and β ≠ 0 outputs
the constant β, and after the channel-wise ops on the way (ReLU → relu(β), pooling and
dropout keep it) its consumer sees a constant input channel k. Dropping the channel drops
that constant; folding puts it back where the slim model has room for it:

- a consumer **Linear** (after pooling and a flatten: ``H·W`` columns per channel) gets
  ``Σ_c k_c · Σ_cols W[:, cols(c)]`` added to its bias, which is exact;
- a consumer **conv** sees the constant in the middle of its map but zero padding at the
  borders, so its output is not one constant per channel. The folded value is the mean of
  the exact contribution over the output map (the conv run on the constant input): the
  best single value per output channel in least squares, exact for convs without zero
  padding, and for 3×3 convs on 1×1 maps (deep VGG stages), where the contribution of the
  whole kernel sum would be far off. It goes to the conv's bias, or — without a bias, when
  the conv feeds only a BatchNorm — is subtracted from that BatchNorm's running mean
  (which is the same in eval mode).

Folding changes values only (bias, running mean), never the structure: a folded slim
checkpoint loads into :func:`~slimcli.prune.apply_widths` like any other. A consumer with
neither a bias nor a BatchNorm of its own is left alone and reported (no parameter is ever
added), as is a path through an op whose effect on a constant is not known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimcli.prune.graph import Analysis
from slimcli.prune.ops import (
    AVG_POOL_FUNCTIONS,
    CONCAT,
    CONSTANT_KEEPING_FUNCTIONS,
    CONSTANT_KEEPING_METHODS,
    CONSTANT_KEEPING_MODULES,
    DROPOUT_FUNCTIONS,
    POOL_FUNCTIONS,
    SUM,
    call_counts,
    describe,
    flattens_shape,
    is_channelwise,
    is_flatten,
    is_shape_query,
)
from slimcli.prune.select import ChannelSelection


@dataclass(frozen=True)
class ShiftFold:
    """One pruned BatchNorm's constant reaching one consumer, and where it went.

    ``targets`` are ``<consumer>.bias``, or the ``<bn>.running_mean`` of every BatchNorm
    the consumer's output reaches (empty: not folded, ``reason`` says why); ``channels``
    counts the pruned channels whose constant is nonzero; ``exact`` is False where zero
    padding (of the conv or of an average pool on the way) makes the folded value a mean
    over the map rather than the value at every pixel.
    """

    bn: str
    consumer: str
    targets: tuple[str, ...]
    channels: int
    exact: bool
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "consumer": self.consumer, "targets": list(self.targets),
                "channels": self.channels, "exact": self.exact, "reason": self.reason}


def _avg_pool_exact(node: Node, m: nn.Module | None) -> bool:
    """Does this average pool keep a constant map constant (no counted zero padding, no ceil)?"""
    if m is not None:
        if not isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return True
        padding, ceil, include = m.padding, m.ceil_mode, m.count_include_pad
    else:
        if node.target not in AVG_POOL_FUNCTIONS:
            return True
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
        given = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
        padding, ceil, include = given.get("padding", 0), given.get("ceil_mode", False), \
            given.get("count_include_pad", True)
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    return not ceil and (not include or all(p == 0 for p in pads))


def _through(
    node: Node, k: Tensor, modules: dict[str, nn.Module], shapes: dict[Node, tuple[int, ...]]
) -> tuple[Tensor | None, bool]:
    """The constant per channel after the channel-wise op ``node`` (None: unknown), and exactness."""
    src = node.all_input_nodes[0]
    row = k.reshape(1, -1).clone()  # ops act elementwise; a fresh tensor for in-place ones
    with torch.no_grad():
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, CONSTANT_KEEPING_MODULES):
                return k, _avg_pool_exact(node, m)
            return m(row).reshape(-1), True  # a zero-preserving activation (graph's list)
        if node.op == "call_function":
            if node.target in CONSTANT_KEEPING_FUNCTIONS:
                return k, _avg_pool_exact(node, None)
            if node.target is torch.sum:
                return k * (math.prod(shapes[src][1:]) / math.prod(shapes[node][1:])), True
            return node.target(row, *node.args[1:], **node.kwargs).reshape(-1), True
        if node.op == "call_method":
            if node.target in CONSTANT_KEEPING_METHODS:
                return k, True
            if node.target == "sum":
                return k * (math.prod(shapes[src][1:]) / math.prod(shapes[node][1:])), True
            if node.target in ("relu", "relu_", "tanh", "tanh_"):
                return getattr(row, node.target)().reshape(-1), True
    return None, False


def _contribution(
    m: nn.Module, k: Tensor, per_channel: int, in_shape: tuple[int, ...]
) -> tuple[Tensor, bool]:
    """(what the constant input channels add to each output, whether it is the same everywhere)."""
    w = m.weight.detach()
    k = k.to(w.dtype)
    if isinstance(m, _ConvNd):
        x = k.reshape(1, -1, *([1] * (len(in_shape) - 2))).expand(1, -1, *in_shape[2:])
        with torch.no_grad():
            u = m(x.contiguous())
        u = u.reshape(u.shape[1], -1)
        if m.bias is not None:  # the constant's part alone
            u = u - m.bias.detach()[:, None]
        v = u.mean(dim=1)
        scale = float(u.abs().max()) if u.numel() else 0.0
        return v, bool((u - v[:, None]).abs().max() <= 1e-6 * max(scale, 1e-30))
    # Linear: channel c is the block of columns [c·per, (c+1)·per)
    return w.reshape(w.shape[0], -1, per_channel).sum(dim=2) @ k, True


def _bn_readers(
    node: Node, modules: dict[str, nn.Module], counts: dict[str, int], shapes: dict[Node, tuple[int, ...]]
) -> tuple[list[tuple[str, Tensor]], str | None]:
    """The BatchNorms that ``node``'s output reaches only through sums, concatenations, pooling,
    dropout and channel selections, each with the position of every channel of ``node`` in its input
    (-1: not selected); or ``([], what)`` when it reaches anything else.

    A constant added to those channels is then the same as subtracting it from the running
    means of these BatchNorms (eval mode): all those ops carry it unchanged.
    """
    found: list[tuple[str, Tensor]] = []
    stack = [(node, torch.arange(shapes[node][1]))]
    while stack:
        src, pos = stack.pop()
        for user in src.users:
            nxt = _carry(user, src, pos, modules, counts, shapes)
            if nxt is None:
                return [], describe(user, modules)
            if user.op == "call_module" and isinstance(modules[user.target], _BatchNorm):
                found.append((user.target, nxt))
            else:
                stack.append((user, nxt))
    return found, None


def _carry(
    user: Node, src: Node, pos: Tensor, modules: dict[str, nn.Module], counts: dict[str, int],
    shapes: dict[Node, tuple[int, ...]],
) -> Tensor | None:
    """Positions of ``src``'s tracked channels in ``user``'s output (None: not a carrying op)."""
    if user not in shapes or len(shapes[src]) < 2:
        return None
    if user.op == "call_module":
        m = modules[user.target]
        if counts[user.target] != 1 or user.args[:1] != (src,) or len(user.all_input_nodes) != 1:
            return None
        if isinstance(m, _BatchNorm):
            return pos if m.running_mean is not None else None
        if isinstance(m, ChannelSelection):
            idx = m.indices.detach().cpu()
            lookup = torch.full((shapes[src][1],), -1, dtype=torch.long)
            lookup[idx] = torch.arange(idx.numel())
            return torch.where(pos >= 0, lookup[pos.clamp(min=0)], -1)
        # pool(x + v) = pool(x) + v, unless it averages in padding
        if isinstance(m, CONSTANT_KEEPING_MODULES):
            return pos if shapes[user][:2] == shapes[src][:2] and _avg_pool_exact(user, m) else None
        return None
    if user.op != "call_function":
        return None
    if user.target in POOL_FUNCTIONS or user.target in DROPOUT_FUNCTIONS:
        ok = user.args[:1] == (src,) and shapes[user][:2] == shapes[src][:2] and _avg_pool_exact(user, None)
        return pos if ok else None
    if user.target in SUM:
        args = user.args
        ok = (len(args) == 2 and not user.kwargs and all(isinstance(a, Node) for a in args)
              and args[0] is not args[1] and shapes[user] == shapes[src])
        return pos if ok else None
    if user.target in CONCAT:
        tensors = user.args[0]
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        if (not isinstance(tensors, (list, tuple)) or not isinstance(dim, int)
                or dim % len(shapes[src]) != 1 or list(tensors).count(src) != 1):
            return None
        offset = sum(shapes[t][1] for t in tensors[: list(tensors).index(src)])  # type: ignore[index]
        return torch.where(pos >= 0, pos + offset, -1)
    return None


def fold_shifts(analysis: Analysis, keep: dict[str, Tensor]) -> list[ShiftFold]:
    """Fold the shift of every channel that ``keep`` drops into its consumers (in place).

    Runs on the dense analysed model *before* the surgery (indices are dense ones), so the
    surgery then slices the adjusted biases and running means like any other tensor.
    """
    gm: GraphModule = analysis.gm
    modules = dict(gm.named_modules())
    counts = call_counts(gm)
    shapes = {n: analysis.shapes[n.name] for n in gm.graph.nodes if n.name in analysis.shapes}
    folds: list[ShiftFold] = []
    for name, index in keep.items():
        edit = analysis.edits.get(name)
        if edit is None:  # a coupled group: its channels go everywhere at once, nothing reads them
            folds.append(ShiftFold(name, "", (), int(index.numel()), False,
                                   "its channels are coupled with other layers (a group, a selection or a "
                                   "partly frozen layer): their shifts are not folded"))
            continue
        bn = modules[name]
        pruned = torch.ones(bn.num_features, dtype=torch.bool, device=bn.bias.device)
        pruned[index.to(bn.bias.device)] = False
        k0 = torch.where(pruned, bn.bias.detach(), torch.zeros_like(bn.bias))
        consumers = dict(edit.consumers)
        stack: list[tuple[Node, Tensor | None, bool, str | None]] = [(edit.bn, k0, True, None)]
        while stack:
            src, k, exact, why = stack.pop()
            for user in src.users:
                if user in consumers:
                    folds.append(_fold_one(name, user, consumers[user], k, exact, why, pruned,
                                           modules, counts, shapes))
                    continue
                if is_shape_query(user, len(shapes[src])):
                    continue
                flat = is_flatten(user, src, shapes) or (
                    user.op == "call_module" and isinstance(modules[user.target], nn.Flatten)
                    and flattens_shape(shapes[src], shapes.get(user)))
                if flat:
                    stack.append((user, k, exact, why))
                    continue
                # the analysis only lets channel-wise ops through
                assert is_channelwise(user, modules, shapes), user
                if k is None:
                    stack.append((user, None, exact, why))
                    continue
                k2, ok = _through(user, k, modules, shapes)
                unknown = f"what {describe(user, modules)} does to a constant is not known"
                note = why if k2 is not None else unknown
                stack.append((user, k2, exact and ok, note))
    return [f for f in folds if f.channels or f.reason]


def _fold_one(
    bn: str, node: Node, per_channel: int, k: Tensor | None, exact: bool, why: str | None, pruned: Tensor,
    modules: dict[str, nn.Module], counts: dict[str, int], shapes: dict[Node, tuple[int, ...]],
) -> ShiftFold:
    m = modules[node.target]
    if k is None:
        return ShiftFold(bn, node.target, (), int(pruned.sum()), False, why)
    nonzero = int((k != 0).sum())
    if not nonzero:
        return ShiftFold(bn, node.target, (), 0, True)
    v, same = _contribution(m, k, per_channel, shapes[node.args[0]])
    exact = exact and same
    with torch.no_grad():
        if m.bias is not None:
            m.bias.add_(v.to(m.bias.dtype))
            return ShiftFold(bn, node.target, (f"{node.target}.bias",), nonzero, exact)
        readers, blocker = _bn_readers(node, modules, counts, shapes)
        if blocker is None and readers:
            for name, pos in readers:
                rm = modules[name].running_mean
                ok = pos >= 0
                rm.index_add_(0, pos[ok].to(rm.device), -v[ok.to(v.device)].to(rm.dtype))
            return ShiftFold(bn, node.target, tuple(f"{n}.running_mean" for n, _ in readers), nonzero, exact)
    return ShiftFold(bn, node.target, (), nonzero, exact,
                     f"'{node.target}' has no bias and its output reaches {blocker or 'no BatchNorm'} "
                     f"(a constant can only go into a bias or into the running mean of BatchNorms "
                     f"reached through sums, concatenations and pooling)")


def fold_summary(folds: list[ShiftFold]) -> dict[str, Any]:
    """JSON-ready totals for a checkpoint's ``slim.prune.fold``."""
    done = [f for f in folds if f.targets]
    return {
        "folded": len(done),
        "approximate": sorted({f.consumer for f in done if not f.exact}),
        "skipped": [{"bn": f.bn, "consumer": f.consumer, "channels": f.channels, "reason": f.reason}
                    for f in folds if not f.targets],
    }
