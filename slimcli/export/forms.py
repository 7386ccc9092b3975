"""The export form of a model: what is rewritten (exactly) before it goes to ONNX, per target runtime.

A slim model is first re-formed for its target (:data:`TARGET_FORMS`, by
:func:`slimcli.prune.reform.reform_all`): its channel selections realised as gathers, zeroed
channels or one-hot convs, its kept channel counts padded with zero channels to a multiple the
runtime's blocked conv kernels need; the same function, checked; the fastest candidate timed.
Then, for every target, a channel selection that keeps every channel of its input in order
(indices ``0 … C−1`` of a ``C``-channel tensor) is an identity and is removed, so it never
becomes an ONNX ``Gather``. Targets (``--target``): ``generic`` (the default), ``ort``,
``openvino``, ``ncnn``. They are recorded in ``slim.target``; a target other than ``generic`` also
checks the model in that runtime (``slimcli.export.runtimes``), so a file exported for ncnn is
known to compute right in ncnn. See docs/export.md.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from slimcli.errors import PruneError, UsageError
from slimcli.prune import ChannelSelection
from slimcli.prune.reform import reform, rel_diff

TARGETS = ("generic", "ort", "openvino", "ncnn")
#: the runtime a target implies a check in (``generic`` implies none beyond onnxruntime's own)
TARGET_RUNTIME = {"generic": None, "ort": "ort", "openvino": "openvino", "ncnn": "ncnn"}


#: how an exported file realises the selections: those of the pruning, ``conv`` (the gathers of
#: ``gather``, each exported as a 1×1 conv with one-hot weights: :func:`selections_as_convs`) and
#: ``pieces`` (the gathers of ``gather``, but a selection of a concatenation reads its pieces:
#: :func:`selections_of_pieces`)
EXPORT_SELECTIONS = ("auto", "gather", "zero", "conv", "pieces")
#: the surgery's realisation each export realisation starts from
SURGERY_SELECTIONS = {"auto": "auto", "gather": "gather", "zero": "zero", "conv": "gather",
                      "pieces": "gather"}

#: per target: the realisations of the selections and the paddings a slim model is re-formed into,
#: in order of preference (the safe default first, fewer MACs first), and the runtime that times
#: them (None: not timed, the first is taken). generic and ncnn promise a file without Gather
#: (ncnn's converter mistranslates it); converting for ncnn per candidate would be too slow to time.
TARGET_FORMS: dict[str, tuple[tuple[str, ...], tuple[int, ...], str | None]] = {
    "generic": (("zero",), (1, 8, 16), "ort"),
    "ort": (("auto", "zero", "gather", "pieces"), (1, 8, 16), "ort"),
    "openvino": (("zero", "conv", "auto", "gather", "pieces"), (1, 8, 16), "openvino"),
    "ncnn": (("zero",), (8,), None),
}


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    return target


def target_form(
    target: str, selections: str | None = None, pad_to: int | None = None
) -> tuple[tuple[str, ...], tuple[int, ...], str | None]:
    """The candidate (selections, paddings, timing runtime) of ``target``; ``selections`` and
    ``pad_to`` (``--selections``, ``--pad-to``) fix one of them."""
    sels, pads, runtime = TARGET_FORMS[check_target(target)]
    if selections is not None and selections not in EXPORT_SELECTIONS:
        raise UsageError(f"selections must be one of {', '.join(EXPORT_SELECTIONS)}, got {selections!r}")
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1):
        raise UsageError(f"pad_to must be an integer >= 1, got {pad_to!r}")
    return (selections,) if selections else sels, (pad_to,) if pad_to else pads, runtime


def _is_identity(indices: torch.Tensor, channels: int) -> bool:
    idx = indices.reshape(-1)
    return idx.numel() == channels and bool(torch.equal(idx.cpu(), torch.arange(channels)))


def _index_select_parts(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """``(input node, indices)`` when ``node`` selects channels (dim 1) with constant indices."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, ChannelSelection) and isinstance(node.args[0], fx.Node):
            return node.args[0], mod.indices
        return None
    is_fn = node.op == "call_function" and node.target is torch.index_select
    is_method = node.op == "call_method" and node.target == "index_select"
    if not (is_fn or is_method) or len(node.args) < 3:
        return None
    src, dim, index = node.args[0], node.args[1], node.args[2]
    if dim != 1 or not isinstance(src, fx.Node) or not isinstance(index, fx.Node) or index.op != "get_attr":
        return None
    value = gm
    for part in str(index.target).split("."):
        value = getattr(value, part)
    return (src, value) if isinstance(value, torch.Tensor) else None


def remove_identity_selections(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """Remove the channel selections of ``model`` that keep all channels in order; return the count.

    ``model`` is changed in place (export works on its own copy). A ``torch.fx.GraphModule``
    loses the graph nodes (``ChannelSelection`` modules and ``index_select`` on dim 1 with a
    constant index); any other module has its identity ``ChannelSelection`` submodules replaced by
    ``nn.Identity``. The input channel count of each selection is read from one forward pass.
    """
    x = torch.zeros(1, *input_shape)
    if isinstance(model, fx.GraphModule):
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(model).propagate(x)
        removed = 0
        for node in list(model.graph.nodes):
            parts = _index_select_parts(model, node)
            if parts is None:
                continue
            src, indices = parts
            meta = src.meta.get("tensor_meta")
            shape = getattr(meta, "shape", None)
            if shape is None or len(shape) < 2 or not _is_identity(indices, int(shape[1])):
                continue
            node.replace_all_uses_with(src)
            model.graph.erase_node(node)
            removed += 1
        if removed:
            model.graph.eliminate_dead_code()
            model.delete_all_unused_submodules()
            model.recompile()
        return model, removed

    seen: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, int(args[0].shape[1])))
        for name, m in model.named_modules()
        if isinstance(m, ChannelSelection)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    removed = 0
    for name, channels in seen.items():
        mod = model.get_submodule(name)
        if isinstance(mod, ChannelSelection) and _is_identity(mod.indices, channels):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
            removed += 1
    return model, removed


def _selection_inputs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, torch.Size]:
    """The input shape of every ChannelSelection of ``model``, from one forward pass."""
    seen: dict[str, torch.Size] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].shape))
        for name, m in model.named_modules()
        if isinstance(m, ChannelSelection)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return seen


def selections_as_convs(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """Replace every channel selection of an image tensor by a 1×1 conv with one-hot weights (the
    same numbers: each output channel is 1 × one input channel); return the count. OpenVINO runs an
    ONNX ``Gather`` on a reference kernel between two layout conversions, a 1×1 conv on its fast
    blocked kernels (and folds the BatchNorm after it). ``model`` is changed in place."""
    replaced = 0
    for name, shape in _selection_inputs(model, input_shape).items():
        mod = model.get_submodule(name)
        if len(shape) != 4:
            continue
        idx = mod.indices.reshape(-1).cpu()
        conv = nn.Conv2d(int(shape[1]), idx.numel(), 1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[torch.arange(idx.numel()), idx, 0, 0] = 1.0
        conv.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, conv.to(mod.indices.device))
        replaced += 1
    return model, replaced


def _is_selection(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ChannelSelection)


def bns_as_depthwise(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace every BatchNorm that reads a channel selection by the depthwise 1×1 conv it computes
    in inference (scale γ/σ, bias β − γμ/σ); return the count. A ``Gather``'s output is in plain
    NCHW: onnxruntime then runs the BatchNorm and the ReLU after it as two passes before converting
    to its blocked layout, but converts a conv to its blocked kernels with the ReLU fused
    (docs/benchmarks.md). ``model`` (a ``torch.fx.GraphModule``; others are left alone) is changed
    in place."""
    if not isinstance(model, fx.GraphModule):
        return model, 0
    replaced = 0
    for node in model.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        bn = model.get_submodule(str(node.target))
        # exactly a BatchNorm2d: a subclass may do more (timm's BatchNormAct2d applies its activation)
        if (type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.running_var is None
                or not _is_selection(model, node.args[0])):
            continue
        c = bn.num_features
        conv = nn.Conv2d(c, c, 1, groups=c, bias=True).to(bn.running_mean.device)
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            weight = bn.weight.double() if bn.weight is not None else torch.ones_like(scale)
            bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
            conv.weight.copy_((weight * scale).view(c, 1, 1, 1))
            conv.bias.copy_(bias - weight * scale * bn.running_mean.double())
        conv.requires_grad_(False)
        parent, _, leaf = str(node.target).rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, conv)
        replaced += 1
    if replaced:
        model.recompile()
    return model, replaced


def _cat_dim(node: fx.Node) -> int | None:
    if node.op != "call_function" or node.target is not torch.cat or not node.args:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    meta = node.meta.get("tensor_meta")
    rank = len(getattr(meta, "shape", ()))
    return dim + rank if isinstance(dim, int) and dim < 0 and rank else dim


def _pieces(node: fx.Node) -> list[fx.Node] | None:
    """The tensors a chain of channel concatenations joins, in order (None: not all known)."""
    if _cat_dim(node) != 1:
        return [node]
    out: list[fx.Node] = []
    for arg in node.args[0]:
        if not isinstance(arg, fx.Node):
            return None
        sub = _pieces(arg)
        if sub is None:
            return None
        out += sub
    return out


def selections_of_pieces(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, list[str]]:
    """Let every channel selection of a concatenation (DenseNet: each layer's BN reads all the
    features before it) read the pieces instead: per piece its whole tensor, a slice or a smaller
    selection, concatenated. The same numbers; the concatenations nobody else reads disappear,
    with their copies, and each selection copies only what it keeps. Returns the model (a
    ``torch.fx.GraphModule`` changed in place; others are left alone) and the names of the modules
    that read the rewritten selections."""
    if not isinstance(model, fx.GraphModule):
        return model, []
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(model).propagate(torch.zeros(1, *input_shape))
    readers: list[str] = []
    for node in list(model.graph.nodes):
        if not _is_selection(model, node) or not isinstance(node.args[0], fx.Node):
            continue
        pieces = _pieces(node.args[0])
        if pieces is None or len(pieces) < 2:
            continue
        widths = [getattr(p.meta.get("tensor_meta"), "shape", ())[1:2] for p in pieces]
        if not all(widths):
            continue
        indices = model.get_submodule(str(node.target)).indices.reshape(-1)
        if not bool((indices.diff() > 0).all()):  # reading piece by piece keeps only increasing order
            continue
        parts: list[fx.Node] = []
        start = 0
        with model.graph.inserting_before(node):
            for i, (piece, (width,)) in enumerate(zip(pieces, widths, strict=True)):
                mine = indices[(indices >= start) & (indices < start + width)] - start
                start += width
                if mine.numel() == 0:
                    continue
                if mine.numel() == width:  # increasing and in range: all of it
                    parts.append(piece)
                elif bool((mine.diff() == 1).all()):
                    lo, hi = int(mine[0]), int(mine[-1]) + 1
                    cut = (piece, (slice(None), slice(lo, hi)))
                    parts.append(model.graph.call_function(operator.getitem, cut))
                else:
                    name = f"{node.target}_piece{i}"
                    model.add_submodule(name, ChannelSelection(mine))
                    parts.append(model.graph.call_module(name, (piece,)))
            joined = parts[0] if len(parts) == 1 else model.graph.call_function(torch.cat, (parts, 1))
        readers += [str(u.target) for u in node.users if u.op == "call_module"]
        node.replace_all_uses_with(joined)
        model.graph.erase_node(node)
    if readers:
        model.graph.eliminate_dead_code()
        model.delete_all_unused_submodules()
        model.recompile()
    return model, readers


def realise(
    model: nn.Module, selections: str, input_shape: tuple[int, ...], *, tolerance: float = 1e-5
) -> tuple[nn.Module, dict[str, Any]]:
    """The export-level rewrites of a model re-formed with ``SURGERY_SELECTIONS[selections]``: one-hot
    convs (``conv``), selections of pieces (``pieces``), and a BatchNorm after a selection as a
    depthwise conv (every form with gathers). Checked: the result computes what ``model`` did
    (a :class:`~slimcli.errors.PruneError` otherwise). Returns the model (changed in place) and
    what was done: ``{"convs": n, "pieces": [reader names], "bn_as_conv": n}``, only non-empty."""
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(x)
    done: dict[str, Any] = {}
    if selections == "conv":
        model, done["convs"] = selections_as_convs(model, input_shape)
    elif selections in ("gather", "auto", "pieces"):
        model, done["bn_as_conv"] = bns_as_depthwise(model)
        if selections == "pieces":
            model, done["pieces"] = selections_of_pieces(model, input_shape)
    done = {k: v for k, v in done.items() if v}
    if done:
        with torch.no_grad():
            got = model.eval()(x)
        diff = rel_diff(got, want)
        if not diff <= tolerance:
            raise PruneError(f"the {selections} form differs from the slim model by {diff:.3g} relative")
    return model, done


def export_form(
    model: nn.Module, dense: nn.Module, selections: str, pad_to: int, input_shape: tuple[int, ...]
) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` (a slim model) as ``slim export --selections S --pad-to P`` writes it: re-formed
    (:func:`~slimcli.prune.reform.reform`, ``dense`` its architecture) and :func:`realise`-d."""
    new, _ = reform(model, dense, selections=SURGERY_SELECTIONS[selections], pad_to=pad_to,
                    input_shape=input_shape)
    return realise(new, selections, input_shape)


__all__ = [
    "EXPORT_SELECTIONS", "SURGERY_SELECTIONS", "TARGETS", "TARGET_FORMS", "TARGET_RUNTIME",
    "bns_as_depthwise", "check_target", "export_form", "realise", "remove_identity_selections",
    "selections_as_convs", "selections_of_pieces", "target_form",
]
