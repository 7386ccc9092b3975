"""Import checkpoints of the network-slimming reference code: the library behind ``slim import``.

The public PyTorch code of network slimming (Liu et al., 2017) and the authors' code of
nonconvex network slimming (Bui et al.) share one file layout:

- training (``main.py``) writes ``model_best.pth.tar`` / ``checkpoint.pth.tar`` holding
  ``{'epoch', 'state_dict', 'best_prec1', 'optimizer'}`` (the nonconvex code prefixes the
  names with the run name);
- pruning (``vggprune.py``, ``resprune.py``, ``denseprune.py``) writes ``pruned.pth.tar``
  holding ``{'cfg', 'state_dict'}``; fine-tuning it (``main.py --refine``) writes the
  training layout again, with the pruned shapes.

Their models are ``vgg`` (``feature.N`` / ``classifier``), ``resnet`` from preresnet.py
(``conv1``, ``layerS.I.{bn1,select,conv1,bn2,conv2,bn3,conv3,downsample.0}``, ``bn``,
``select``, ``fc``) and ``densenet`` (``conv1``, ``denseB.I.{bn1,select,conv1}``,
``transT.{bn1,select,conv1}``, ``bn``, ``select``, ``fc``). A ``channel_selection`` module
after a BatchNorm holds an ``indexes`` vector of 0/1: the BatchNorm keeps its full width and
the selection passes on the channels whose entry is non-zero.

:func:`import_reference` reads such a file with ``torch.load(weights_only=True)`` only
(:func:`slimcli.checkpoint.read_pth`), renames the keys onto slim's built-in ``vgg``,
``resnet164`` and ``densenet40``, derives the widths from the tensor shapes, rebuilds the slim
structure with :func:`slimcli.prune.apply_widths`, and maps every reference selection onto
slim's: slim puts its :class:`~slimcli.prune.select.ChannelSelection` *in front of* the
BatchNorm (``<bn>_select.indices``) and narrows the BatchNorm, which computes the same thing
because a BatchNorm acts on each channel alone — ``select(bn(x)) == bn[idx](x[:, idx])``. The
selection buffer receives the reference's kept indices, not the first ``k`` that
``apply_widths`` starts from, so the imported model computes exactly what the reference
model computes. The result is an ordinary slim checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimcli.archs import create_arch
from slimcli.checkpoint import STAGES, file_sha256, lineage_entry, read_pth, save_checkpoint
from slimcli.data import create_dataset
from slimcli.errors import CheckpointError, PruneError, UsageError
from slimcli.flows.prune import check_out
from slimcli.measure import measure
from slimcli.model import first_names, fit_problems
from slimcli.prune import apply_widths
from slimcli.registry import ARCHS, DATASETS

SUFFIX = ".safetensors"
#: The reference code trains on 32×32 CIFAR images; its fixed 2×2 / 8×8 average pools equal slim's
#: adaptive pools at that size only.
INPUT_SHAPE = (3, 32, 32)
#: The normalisation both reference codes use for CIFAR-10 and CIFAR-100 (main.py, the prune scripts).
REFERENCE_NORMALIZATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
#: classifier outputs → the dataset recorded when --dataset is not given
DEFAULT_DATASETS = {10: "cifar10", 100: "cifar100"}
#: slim architecture name for each reference model family
SLIM_ARCH = {"vgg": "vgg", "resnet": "resnet164", "densenet": "densenet40"}
#: number of convs in the reference vgg → its depth
_VGG_DEPTHS = {8: 11, 10: 13, 13: 16, 16: 19}
_BN_ATTRS = ("weight", "bias", "running_mean", "running_var")
_SELECT = "_select.indices"

# reference key → slim key, per family (the BatchNorm sub-keys and weights follow the module name)
_RENAME: dict[str, list[tuple[str, str]]] = {
    "vgg": [(r"feature\.(\d+)\.(\w+)", r"features.\1.\2"), (r"classifier\.(weight|bias)", r"classifier.\1")],
    "resnet": [
        (r"conv1\.weight", "stem.weight"),
        (r"layer([123])\.(\d+)\.(bn[123]|conv[123])\.(\w+)", r"stage\1.\2.\3.\4"),
        (r"layer([123])\.(\d+)\.downsample\.0\.weight", r"stage\1.\2.shortcut.weight"),
        (r"bn\.(\w+)", r"bn.\1"), (r"fc\.(weight|bias)", r"fc.\1"),
    ],
    "densenet": [
        (r"conv1\.weight", "stem.weight"),
        (r"dense([123])\.(\d+)\.bn1\.(\w+)", r"block\1.\2.bn.\3"),
        (r"dense([123])\.(\d+)\.conv1\.weight", r"block\1.\2.conv.weight"),
        (r"trans([12])\.bn1\.(\w+)", r"trans\1.bn.\2"),
        (r"trans([12])\.conv1\.weight", r"trans\1.conv.weight"),
        (r"bn\.(\w+)", r"bn.\1"), (r"fc\.(weight|bias)", r"fc.\1"),
    ],
}
# reference channel_selection → the slim BatchNorm it follows
_SELECTIONS: dict[str, list[tuple[str, str]]] = {
    "vgg": [],
    "resnet": [(r"layer([123])\.(\d+)\.select\.indexes", r"stage\1.\2.bn1"), (r"select\.indexes", "bn")],
    "densenet": [
        (r"dense([123])\.(\d+)\.select\.indexes", r"block\1.\2.bn"),
        (r"trans([12])\.select\.indexes", r"trans\1.bn"), (r"select\.indexes", "bn"),
    ],
}
_REFERENCE_NAME = {"vgg": "vgg (models/vgg.py)", "resnet": "resnet (models/preresnet.py)",
                   "densenet": "densenet (models/densenet.py)"}


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class ReferenceFile:
    """One reference checkpoint as read: its state dict and what else the file said."""

    path: Path
    sha256: str
    tensors: dict[str, Tensor]  # the model's state_dict (a DataParallel ``module.`` prefix removed)
    layout: str  # "training" (epoch, best_prec1, …), "pruned" (cfg), or "state_dict" (a bare one)
    cfg: list[Any] | None = None
    epoch: int | None = None
    best_prec1: float | None = None
    keys: list[str] = field(default_factory=list)  # the file's top-level keys

    @property
    def trained(self) -> bool:
        """Written by training (main.py), not straight out of a prune script."""
        return self.layout == "training"


def _number(value: Any) -> float | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def read_reference(path: str | os.PathLike[str]) -> ReferenceFile:
    """Read a reference checkpoint (zip or legacy ``torch.save``) with ``weights_only=True`` only."""
    p = Path(path)
    obj = read_pth(p)
    what = ("expected the dict the reference code saves: {'state_dict': …} with 'epoch', 'best_prec1' "
            "and 'optimizer' (main.py) or 'cfg' (the prune scripts)")
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a reference checkpoint; {what}")
    keys = [str(k) for k in obj]
    if "state_dict" in obj:
        state = obj["state_dict"]
        layout = "training" if "epoch" in obj else "pruned" if "cfg" in obj else "state_dict"
    elif all(isinstance(v, Tensor) for v in obj.values()):
        state, layout = obj, "state_dict"
    else:
        raise CheckpointError(f"{p} has no 'state_dict' entry (it has {', '.join(keys[:6])}); {what}")
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{p}: 'state_dict' does not hold tensors only; {what}")
    tensors = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in tensors):  # saved from a DataParallel model
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    cfg = obj.get("cfg")
    if cfg is not None and not (isinstance(cfg, list) and all(
            c == "M" or (isinstance(c, int) and not isinstance(c, bool)) for c in cfg)):
        raise CheckpointError(f"{p}: 'cfg' must be a list of channel counts (and 'M'), got "
                              f"{str(cfg)[:60]}; the file was not written by the reference prune scripts")
    epoch = obj.get("epoch")
    return ReferenceFile(
        path=p, sha256=file_sha256(p), tensors=tensors, layout=layout, cfg=cfg,
        epoch=int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
        best_prec1=_number(obj.get("best_prec1")), keys=keys,
    )


# ----------------------------------------------------------------------------------------------
# recognising the model


@dataclass(frozen=True)
class Detected:
    """The reference model a state dict belongs to, and the slim arch spec that matches it."""

    family: str  # "vgg", "resnet" or "densenet" (the reference's class names)
    depth: int
    num_classes: int
    spec: str  # canonical slim arch spec, e.g. "densenet40:stem=24"

    @property
    def suggest(self) -> str:
        """The spec as a user types it (``vgg19`` rather than the canonical ``vgg``)."""
        return f"vgg{self.depth}" if self.family == "vgg" else self.spec

    def describe(self) -> str:
        return f"reference {_REFERENCE_NAME[self.family]}, depth {self.depth}, {self.num_classes} classes"


def _count(tensors: dict[str, Tensor], pattern: str) -> int:
    return len({m[1] for k in tensors if (m := re.fullmatch(pattern, k))})


def detect(tensors: dict[str, Tensor], where: str = "the file") -> Detected:
    """Which reference model ``tensors`` (a reference state dict) come from; a
    :class:`CheckpointError` for any other layout."""
    def unknown(why: str) -> CheckpointError:
        return CheckpointError(
            f"{where} is not a checkpoint of the network-slimming reference code ({why}; its first keys are "
            f"{first_names(sorted(tensors), 4)}); slim import reads its vgg, preresnet and densenet models — "
            f"load other PyTorch weights with slimcli.checkpoint.import_pth"
        )

    def classes(key: str) -> int:
        t = tensors.get(key)
        if t is None or t.dim() != 1:
            raise unknown(f"no classifier '{key}'")
        return int(t.shape[0])

    try:
        if any(k.startswith("feature.") for k in tensors):
            convs = [k for k, v in tensors.items()
                     if re.fullmatch(r"feature\.\d+\.weight", k) and v.dim() == 4]
            if len(convs) not in _VGG_DEPTHS:
                raise unknown(f"a vgg with {len(convs)} convs; the reference has 8, 10, 13 or 16 "
                              f"(vgg11…vgg19)")
            depth = _VGG_DEPTHS[len(convs)]
            return Detected("vgg", depth, classes("classifier.bias"), str(ARCHS.parse(f"vgg{depth}")))
        if any(k.startswith("layer1.") for k in tensors):
            n = _count(tensors, r"layer1\.(\d+)\..*")
            depth = 9 * n + 2
            spec = str(ARCHS.parse("resnet164", depth=depth))
            return Detected("resnet", depth, classes("fc.bias"), spec)
        if any(k.startswith("dense1.") for k in tensors):
            n = _count(tensors, r"dense1\.(\d+)\..*")
            conv, stem = tensors.get("dense1.0.conv1.weight"), tensors.get("conv1.weight")
            if conv is None or stem is None or conv.dim() != 4 or stem.dim() != 4:
                raise unknown("a densenet without conv1.weight or dense1.0.conv1.weight")
            spec = str(ARCHS.parse("densenet40", depth=3 * n + 4, growth=int(conv.shape[0]),
                                   stem=int(stem.shape[0])))
            return Detected("densenet", 3 * n + 4, classes("fc.bias"), spec)
    except UsageError as exc:  # e.g. a depth slim's arch does not accept
        raise unknown(str(exc)) from None
    raise unknown("no feature.*, layer1.* or dense1.* keys")


# ----------------------------------------------------------------------------------------------
# converting


@dataclass
class Converted:
    """A reference state dict turned into a slim model (CPU, eval mode) and what it took."""

    model: nn.Module
    spec: str
    detected: Detected
    widths: dict[str, int]  # narrower BatchNorms only (empty: dense)
    channels: dict[str, int]  # every BatchNorm's full width in the dense arch
    selections: dict[str, list[int]]  # slim BatchNorm → the reference's kept channels (non-trivial ones)
    key_map: dict[str, str]  # slim key → the reference key it came from

    @property
    def pruned(self) -> bool:
        return bool(self.widths)


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _check_cfg(ref_cfg: list[Any] | None, kept: list[int], where: str) -> None:
    """The prune scripts' ``cfg`` is every BatchNorm's kept count in module order (plus 'M' in vgg)."""
    if ref_cfg is None:
        return
    counts = [int(c) for c in ref_cfg if c != "M"]
    if counts != kept:
        raise CheckpointError(
            f"{where}: its 'cfg' ({first_names([str(c) for c in counts], 6)}) disagrees with the kept "
            f"channels of its state_dict ({first_names([str(c) for c in kept], 6)}); the file is damaged "
            f"or was edited"
        )


def convert(
    tensors: dict[str, Tensor], arch: str | None = None, *, cfg: list[Any] | None = None,
    where: str = "the file",
) -> Converted:
    """The slim model holding the weights of a reference state dict.

    ``arch`` is a slim arch spec of the same family (default: the one :func:`detect` finds);
    a spec that does not fit is a :class:`CheckpointError` naming the first tensors that
    disagree and the spec that would fit. ``cfg`` (the prune scripts' channel list) is checked
    against the shapes when given.
    """
    detected = detect(tensors, where)
    spec = str(ARCHS.parse(arch)) if arch else detected.spec
    name = ARCHS.parse(spec).name
    if name != SLIM_ARCH[detected.family]:
        raise CheckpointError(
            f"{where} holds a {detected.describe()}, which slim's '{name}' cannot hold; "
            f"use --arch {detected.suggest}"
        )
    family = detected.family
    hint = (f"the file matches --arch {detected.suggest}" if detected.spec != spec
            else "was it written by a modified copy of the reference code?")

    # 1. rename; remember each reference selection by the slim BatchNorm it follows
    renamed: dict[str, Tensor] = {}
    key_map: dict[str, str] = {}
    raw_select: dict[str, tuple[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        bn = _apply(_SELECTIONS[family], key)
        if bn is not None:
            raw_select[bn] = (key, value)
            continue
        new = _apply(_RENAME[family], key)
        if new is None:
            unknown.append(key)
        else:
            renamed[new], key_map[new] = value, key
    if unknown:
        raise CheckpointError(f"{where} has tensors the reference {family} does not have: "
                              f"{first_names(unknown)}; it was not written by the network-slimming "
                              f"reference code")

    # 2. the selections: which channels each one passes on
    kept: dict[str, Tensor] = {}
    for bn, (key, value) in raw_select.items():
        gamma = renamed.get(f"{bn}.weight")
        if value.dim() != 1 or gamma is None or value.numel() != gamma.numel():
            raise CheckpointError(
                f"{where}: {key} has {value.numel()} entries but its BatchNorm has "
                f"{'no weight' if gamma is None else f'{gamma.numel()} channels'}; the file is damaged"
            )
        index = (value != 0).nonzero().reshape(-1)
        if index.numel() == 0:
            raise CheckpointError(f"{where}: {key} selects no channel at all; the reference model itself "
                                  f"cannot run (a pruning ratio that emptied a layer)")
        if index.numel() < value.numel():
            kept[bn] = index
        key_map[bn + _SELECT] = key

    # 3. the dense slim model, and the widths the file's shapes ask for
    try:
        model = create_arch(spec, detected.num_classes, INPUT_SHAPE)
    except UsageError as exc:
        raise CheckpointError(f"cannot build --arch {spec} for {where}: {exc}") from None
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    channels = {n: int(m.num_features) for n, m in bns.items()}
    widths: dict[str, int] = {}
    too_wide: list[str] = []
    order = {k: i for i, k in enumerate(tensors)}
    counts: list[tuple[int, int]] = []  # (position of the BatchNorm in the file, channels kept)
    for n, full in channels.items():
        gamma = renamed.get(f"{n}.weight")
        if gamma is None:
            continue  # reported as missing below
        k = kept[n].numel() if n in kept else int(gamma.numel())
        counts.append((order[key_map[f"{n}.weight"]], k))
        if gamma.numel() > full:
            src = key_map[f"{n}.weight"]
            too_wide.append(f"{n}.weight (file {src}) ({gamma.numel()},) vs model ({full},)")
        elif k < full:
            widths[n] = k
    if too_wide:
        raise CheckpointError(
            f"{where} does not fit --arch {spec} (shape mismatch: {first_names(too_wide)}); {hint}")
    _check_cfg(cfg, [k for _, k in sorted(counts)], where)  # cfg follows the reference's module order

    # 4. the slim structure: apply_widths keeps the first k channels; the values come next
    slim: nn.Module = model
    if widths:
        try:
            slim = apply_widths(model, widths, input_shape=INPUT_SHAPE)
        except PruneError as exc:
            raise CheckpointError(f"slim cannot rebuild the pruned structure of {where}: {exc}") from None

    # 5. the state dict of the slim model, from the reference tensors
    expected = slim.state_dict()
    state: dict[str, Tensor] = {}
    missing: list[str] = []
    for key in expected:
        module, _, attr = key.rpartition(".")
        if key.endswith(_SELECT):
            bn = key[: -len(_SELECT)]
            if bn in kept:
                state[key] = kept[bn]
            else:  # slim selects where the reference narrowed in place: no indices to give it
                missing.append(f"{key} (slim selects channels of {bn}, the file has no selection for it)")
        elif module in kept and attr in _BN_ATTRS and key in renamed:
            state[key] = renamed[key].index_select(0, kept[module])
        elif key in renamed:
            state[key] = renamed[key]
        elif attr == "num_batches_tracked":  # files from PyTorch < 0.4.1 lack it
            state[key] = torch.zeros((), dtype=torch.long)
        else:
            missing.append(key)
    dropped = [bn for bn in kept if bn + _SELECT not in expected]
    unexpected = [f"{key_map.get(k, k)}" for k in renamed if k not in expected]
    wrong = [
        f"{k} (file {key_map.get(k, k)}) {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items() if v.shape != expected[k].shape
    ]
    problems = fit_problems(wrong, missing, unexpected)
    if dropped:
        problems.append(f"slim has no channel selection for {first_names(dropped)}")
    if problems:
        raise CheckpointError(f"{where} does not fit --arch {spec} ({'; '.join(problems)}); {hint}")
    slim.load_state_dict(state, strict=True)
    return Converted(
        model=slim.eval(), spec=spec, detected=detected, widths=widths, channels=channels,
        selections={bn: idx.tolist() for bn, idx in kept.items()}, key_map=key_map,
    )


# ----------------------------------------------------------------------------------------------
# the command


@dataclass
class ImportResult:
    """What :func:`import_reference` read and wrote."""

    source: ReferenceFile
    converted: Converted
    out: Path
    sha256: str
    meta: dict[str, Any]
    params_dense: int
    params: int
    flops_dense: int
    flops: int

    @property
    def model(self) -> nn.Module:
        return self.converted.model

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``slim import --json``)."""
        c, s = self.converted, self.source
        return {
            "source": str(s.path), "source_sha256": s.sha256, "layout": s.layout, "epoch": s.epoch,
            "best_prec1": s.best_prec1, "reference": c.detected.describe(), "arch": c.spec,
            "stage": self.meta["stage"], "dataset": self.meta.get("dataset"), "out": str(self.out),
            "sha256": self.sha256, "widths": dict(c.widths),
            "channels_before": sum(c.channels.values()),
            "channels_after": sum(c.widths.get(n, k) for n, k in c.channels.items()),
            "selections": {bn: len(idx) for bn, idx in c.selections.items()},
            "params_dense": self.params_dense, "params": self.params,
            "flops_dense": self.flops_dense, "flops": self.flops,
        }


def default_out(path: str | os.PathLike[str]) -> Path:
    """``model_best.pth.tar`` → ``model_best.safetensors`` beside it."""
    p = Path(path)
    stem = p.name
    for ext in (".pth.tar", ".pth", ".pt", ".tar", ".ckpt"):
        if stem.endswith(ext) and len(stem) > len(ext):
            stem = stem[: -len(ext)]
            break
    return p.with_name(stem + SUFFIX)


def _dataset(spec: str | None, num_classes: int, where: str) -> Any:
    if spec is None:
        spec = DEFAULT_DATASETS.get(num_classes)
        if spec is None:
            return None
    ds = create_dataset(str(DATASETS.parse(spec)))
    if ds.num_classes != num_classes or tuple(ds.input_shape) != INPUT_SHAPE:
        raise UsageError(
            f"--dataset {ds.spec} has {ds.num_classes} classes of shape {tuple(ds.input_shape)}, but {where} "
            f"classifies {num_classes} classes of 32×32 colour images; pass the dataset it was trained on"
        )
    return ds


def import_reference(
    path: str | os.PathLike[str],
    arch: str | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    dataset: str | None = None,
    stage: str | None = None,
    command: str | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> ImportResult:
    """Convert a reference ``.pth.tar`` into a slim checkpoint at ``out`` (default :func:`default_out`).

    ``arch`` is the slim spec (``vgg19``, ``resnet164``, ``densenet40:stem=24``, …; default:
    detected from the file); ``dataset`` defaults to cifar10 / cifar100 by the number of
    classes; ``stage`` defaults to ``sparsify`` for a dense file, ``pruned`` for the output of a
    prune script and ``finetuned`` for a pruned model trained further (``main.py --refine``).
    The normalisation recorded is the reference code's CIFAR one
    (:data:`REFERENCE_NORMALIZATION`). ``command`` goes into the lineage, whose parent is the
    sha256 of the ``.pth.tar`` file. An existing ``out`` is replaced only with ``force``.
    """
    say = log or (lambda _msg: None)
    source = Path(path)
    target = Path(out) if out is not None else default_out(source)
    check_out(source, target, force, default=default_out(source), what="import")
    if stage is not None and stage not in STAGES:
        raise UsageError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    ref = read_reference(source)
    where = str(source)
    detected = detect(ref.tensors, where)
    ds = _dataset(dataset, detected.num_classes, where)
    conv = convert(ref.tensors, arch, cfg=ref.cfg, where=where)
    say(f"read {source}: {detected.describe()} ({ref.layout} layout) → {conv.spec}")
    if stage is None:
        stage = ("finetuned" if ref.trained else "pruned") if conv.pruned else "sparsify"

    dense_cost = measure(create_arch(conv.spec, detected.num_classes, INPUT_SHAPE), INPUT_SHAPE)
    cost = measure(conv.model, INPUT_SHAPE)
    record: dict[str, Any] = {
        "code": "network-slimming reference (Liu et al. 2017; Bui et al., nonconvex network slimming)",
        "file": source.name, "sha256": ref.sha256, "layout": ref.layout, "keys": ref.keys,
        "reference_model": f"{detected.family}, depth {detected.depth}",
        "epoch": ref.epoch, "best_prec1": ref.best_prec1, "cfg": ref.cfg,
        "selections": {bn: len(idx) for bn, idx in conv.selections.items()},
    }
    meta: dict[str, Any] = {
        "arch": conv.spec, "num_classes": detected.num_classes, "input_shape": list(INPUT_SHAPE),
        "normalization": dict(REFERENCE_NORMALIZATION), "stage": stage, "metrics": {},
        "import": record, "lineage": [lineage_entry(stage, ref.sha256, command)],
    }
    if ds is not None:
        meta["dataset"], meta["classes"] = ds.spec, list(ds.classes)
    if conv.pruned:
        meta["widths"] = dict(getattr(conv.model, "slim_widths", None) or conv.widths)
        meta["prune"] = {
            "by": "the reference prune scripts (imported)",
            "kept": {n: conv.widths.get(n, k) for n, k in conv.channels.items()},
            "channels": dict(conv.channels),
            "params_before": dense_cost.params, "params_after": cost.params,
            "params_pruned_ratio": 1.0 - cost.params / dense_cost.params if dense_cost.params else 0.0,
            "flops_before": dense_cost.flops, "flops_after": cost.flops,
            "flops_pruned_ratio": 1.0 - cost.flops / dense_cost.flops if dense_cost.flops else 0.0,
            "source_sha256": ref.sha256,
        }
    sha = save_checkpoint(target, conv.model, meta)
    say(f"wrote {target}")
    return ImportResult(ref, conv, target, sha, meta, dense_cost.params, cost.params,
                        dense_cost.flops, cost.flops)


__all__ = [
    "DEFAULT_DATASETS",
    "INPUT_SHAPE",
    "REFERENCE_NORMALIZATION",
    "Converted",
    "Detected",
    "ImportResult",
    "ReferenceFile",
    "convert",
    "default_out",
    "detect",
    "import_reference",
    "read_reference",
]
