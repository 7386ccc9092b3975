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

import torch
from torch import fx, nn

from slimcli.errors import UsageError
from slimcli.prune import ChannelSelection

TARGETS = ("generic", "ort", "openvino", "ncnn")
#: the runtime a target implies a check in (``generic`` implies none beyond onnxruntime's own)
TARGET_RUNTIME = {"generic": None, "ort": "ort", "openvino": "openvino", "ncnn": "ncnn"}


#: how an exported file realises the selections: those of the pruning, and ``conv`` (the gathers of
#: ``gather``, each exported as a 1×1 conv with one-hot weights: :func:`selections_as_convs`)
EXPORT_SELECTIONS = ("auto", "gather", "zero", "conv")

#: per target: the realisations of the selections and the paddings a slim model is re-formed into,
#: in order of preference (the safe default first, fewer MACs first), and the runtime that times
#: them (None: not timed, the first is taken). generic and ncnn promise a file without Gather
#: (ncnn's converter mistranslates it); converting for ncnn per candidate would be too slow to time.
TARGET_FORMS: dict[str, tuple[tuple[str, ...], tuple[int, ...], str | None]] = {
    "generic": (("zero",), (1, 8, 16), "ort"),
    "ort": (("auto", "zero", "gather"), (1, 8, 16), "ort"),
    "openvino": (("zero", "conv", "auto", "gather"), (1, 8, 16), "openvino"),
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


__all__ = [
    "EXPORT_SELECTIONS", "TARGETS", "TARGET_FORMS", "TARGET_RUNTIME", "check_target",
    "remove_identity_selections", "selections_as_convs", "target_form",
]
