"""The same slim model in another exact form: for a runtime (``slim export --target``).

A slim model's structure is one realisation of its pruning: where a BatchNorm reads a shared
tensor it has a channel selection in front (an ONNX ``Gather``) or keeps its width with zeroed
channels (``--selections``), and its widths are whatever the rule left (``--round-to``). Which
realisation runs fastest depends on the runtime, and none of them changes what the model
computes. :func:`reform` turns a slim model into another realisation of the *same* function:

1. :func:`unprune` scatters the slim weights back into the dense architecture (every removed
   channel is zero, which is what removing it means: the masked dense model), exactly, by
   running the surgery once on a dense model whose every tensor entry holds its own index;
2. the kept channels are padded (``pad_to``): every kept count is rounded up to a multiple of
   ``pad_to`` (never past the dense width) by keeping some removed channels, whose weights are
   zero; blocked CPU conv kernels (onnxruntime's NCHWc, oneDNN's nChw16c, ncnn's packN) need
   channel counts in multiples of 4, 8 or 16, and every count stays ≤ the dense one;
3. the surgery runs again with the wanted ``selections``;
4. the result is checked against the input model on random inputs; a mismatch is an error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from slimcli.errors import PruneError
from slimcli.prune.graph import analyze
from slimcli.prune.rules import couple_masks, round_up
from slimcli.prune.surgery import SELECTIONS, PruneReport, prune_model, rebuild

#: ids are exact in float32 up to 2**24 entries per tensor
_MAX_ENTRIES = 1 << 24


def _bns(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def unprune(model: nn.Module, dense: nn.Module, *, input_shape: Sequence[int] | None = None) -> nn.Module:
    """The masked dense model ``model`` (a slim model, with ``slim_keep``) realises; ``dense`` is its
    architecture (weights unused, not modified). Removed channels are zero (running variance 1)."""
    keep: Mapping[str, Tensor] | None = getattr(model, "slim_keep", None)
    if not keep:
        raise PruneError("the model records no kept channels (slim_keep); only a slim model can be unpruned")
    coupling = str(getattr(model, "slim_coupling", None) or "auto")
    shape = input_shape if input_shape is not None else getattr(dense, "input_shape", None)
    analysis = analyze(copy.deepcopy(dense).float().eval(), shape, coupling=coupling)
    # every float entry of the dense model holds its own flat index + 1 (0: nothing came from here)
    with torch.no_grad():
        for name, t in analysis.gm.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                if t.numel() >= _MAX_ENTRIES:
                    raise PruneError(f"'{name}' has {t.numel():,} entries, too many to re-form exactly")
                t.copy_(torch.arange(1, t.numel() + 1, dtype=torch.float32).view_as(t))
    widths = {n: int(torch.as_tensor(m).sum()) for n, m in keep.items()}
    ids = rebuild(analysis, widths, keep=keep).state_dict()
    slim = model.state_dict()
    out = copy.deepcopy(dense).float().eval()
    target = out.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in target.items():
            if name not in slim or name not in ids:
                raise PruneError(f"'{name}' of the dense model is not in the slim model; the slim model "
                                 f"does not come from this architecture")
            value = slim[name].detach().to("cpu")
            if not t.is_floating_point():
                t.copy_(value)
                continue
            if ids[name].shape != value.shape:
                raise PruneError(f"'{name}' is {tuple(value.shape)} in the slim model but its recorded "
                                 f"channels give {tuple(ids[name].shape)}; the model and slim_keep differ")
            t.fill_(1.0 if name.endswith("running_var") else 0.0)
            t.view(-1)[ids[name].reshape(-1).long() - 1] = value.reshape(-1).float()
    return out


def _live(masked: nn.Module, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``keep`` without the channels that are zeros anyway (γ = β = 0: zero-realised selections)."""
    bns = _bns(masked)
    out = {}
    for name, mask in keep.items():
        m = torch.as_tensor(mask).reshape(-1).to(torch.bool).clone()
        bn = bns.get(name)
        if bn is not None and bn.weight is not None:
            zero = bn.weight.detach().cpu() == 0
            if bn.bias is not None:
                zero &= bn.bias.detach().cpu() == 0
            if bool((m & ~zero).any()):  # never empty a layer
                m &= ~zero
        out[name] = m
    return out


def rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a − b| / max(1, max |b|): the relative difference every re-formed model is checked by."""
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def reform_all(
    model: nn.Module, dense: nn.Module, forms: Sequence[tuple[str, int]], *,
    input_shape: Sequence[int] | None = None, tolerance: float = 1e-5, seed: int = 0,
) -> list[tuple[GraphModule, PruneReport]]:
    """``model`` (a slim model) realised in each of ``forms`` — (selections, pad_to): selections as
    in :func:`~slimcli.prune.surgery.prune_model`, kept counts padded to multiples of pad_to. Returns
    (new slim model, prune report) per form, each checked equal to ``model``; the masked dense model,
    its analysis and the reference output are computed once for all of them."""
    for selections, pad_to in forms:
        if selections not in SELECTIONS:
            raise PruneError(f"selections must be one of {', '.join(SELECTIONS)}, got {selections!r}")
        if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
            raise PruneError(f"pad_to must be an integer >= 1, got {pad_to!r}")
    shape = tuple(input_shape if input_shape is not None else getattr(dense, "input_shape", ()))
    coupling = str(getattr(model, "slim_coupling", None) or "auto")
    masked = unprune(model, dense, input_shape=shape)
    bns = analyze(copy.deepcopy(masked), shape, coupling=coupling).bns
    live = {n: m for n, m in _live(masked, model.slim_keep).items() if n in bns and bns[n].prunable}
    if any(b.classes is not None for b in bns.values()):
        live = couple_masks(live, bns)
    modules = _bns(masked)
    scores = {n: modules[n].weight.detach().abs().cpu() for n in live}
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = copy.deepcopy(model).to("cpu", torch.float32).eval()(x)
    out = []
    for selections, pad_to in forms:
        masks = round_up(live, scores, bns, pad_to) if pad_to > 1 else live
        slim, report = prune_model(masked, masks, input_shape=shape, coupling=coupling, selections=selections)
        slim.slim_form = {"selections": selections, "pad_to": pad_to}
        with torch.no_grad():
            diff = rel_diff(slim.eval()(x), want)
        if not diff <= tolerance:
            raise PruneError(f"the re-formed model differs from the slim model by {diff:.3g} relative (> "
                             f"{tolerance:g}); export it as pruned instead")
        out.append((slim, report))
    return out


def reform(
    model: nn.Module, dense: nn.Module, *, selections: str = "auto", pad_to: int = 1,
    input_shape: Sequence[int] | None = None, tolerance: float = 1e-5, seed: int = 0,
) -> tuple[GraphModule, PruneReport]:
    """:func:`reform_all` for one form: the new slim model (checked equal to ``model``) and its report."""
    return reform_all(model, dense, [(selections, pad_to)], input_shape=input_shape, tolerance=tolerance,
                      seed=seed)[0]


def form_summary(report: PruneReport, rewrites: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per-layer form counts and widths of a re-formed model (``slim.form`` of an exported file);
    ``rewrites`` (of :func:`slimcli.export.forms.realise`) names the layers whose selection reads
    the pieces of a concatenation (form ``pieces``)."""
    pieces = set((rewrites or {}).get("pieces", ()))
    layers = {la.name: ("pieces" if la.name in pieces else la.form) for la in report.layers if la.form}
    counts: dict[str, int] = {}
    for form in layers.values():
        counts[form] = counts.get(form, 0) + 1
    return {"forms": counts, "widths": dict(report.widths),
            "layers": {name: form for name, form in layers.items() if form != "narrow"}}

__all__ = ["form_summary", "reform", "reform_all", "rel_diff", "unprune"]
