"""Contract checks for plugins: the checks slim's own test suite runs on every penalty, arch and dataset.

Call them from a plugin's tests, one line each::

    from slimcli.testing import check_arch, check_dataset, check_penalty

    def test_contract():
        check_penalty("logsum")            # a spec string, or the registered class
        check_arch("tinycnn:width=8")      # forward, fx trace, ONNX, init, stem, strict reload
        check_dataset("stripes:n=64")      # attributes, both splits, split validation

Each check raises :class:`AssertionError` saying what broke (and works under ``python -O``:
it does not rely on ``assert`` statements). The arch checks are also available one by one
(:func:`check_arch_forward`, …) for finer-grained test reports. Nothing here needs pytest.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimcli.archs import create_arch
from slimcli.data import Dataset, create_dataset
from slimcli.errors import UsageError
from slimcli.penalties import Penalty, create_penalty
from slimcli.registry import ARCHS, DATASETS, PENALTIES, Registry

#: |x| at which penalties are probed (each with both signs): 0, tiny values, a wide range of magnitudes.
PENALTY_MAGNITUDES = (
    0.0, 1e-12, 1e-9, 1e-6, 1e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.99, 1.0, 1.7, 2.5, 3.0, 10.0,
)  # fmt: skip
#: prox steps the penalty contract tries
PROX_STEPS = (1e-3, 0.1, 1.0)
#: input shapes the arch contract builds for: CIFAR-like and (Fashion-)MNIST-like
ARCH_SHAPES: tuple[tuple[int, int, int], ...] = ((3, 32, 32), (1, 28, 28))
_CLASSES = 7  # an unusual class count, so nothing can hard-code 10


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _spec(registry: Registry, cls_or_spec: str | type) -> str:
    """A spec string, or the registered name of a plugin class (its cheap ``test_spec`` if it has one)."""
    if isinstance(cls_or_spec, str):
        return cls_or_spec
    name = getattr(cls_or_spec, "name", None)
    _expect(
        isinstance(name, str) and name in registry and registry.get(name).cls is cls_or_spec,
        f"{cls_or_spec.__name__} is not a registered {registry.kind}; "
        f"decorate it with @register_{registry.kind}",
    )
    return str(getattr(cls_or_spec, "test_spec", name))


# --------------------------------------------------------------------------------------
# penalties
# --------------------------------------------------------------------------------------
def penalty_points(dtype: torch.dtype = torch.float64) -> Tensor:
    """The probe vector of :func:`check_penalty`: :data:`PENALTY_MAGNITUDES` with both signs (one 0)."""
    return torch.tensor([s * m for m in PENALTY_MAGNITUDES for s in (1, -1)][1:], dtype=dtype)


def check_penalty(
    cls_or_spec: str | type[Penalty],
    *,
    lam: float = 0.05,
    dtypes: Iterable[torch.dtype] = (torch.float32, torch.float64),
) -> None:
    """The penalty contract, in every dtype of ``dtypes``.

    ``value`` is a finite 0-dim tensor of the input's dtype, R(0) = 0 and R is even; the
    subgradient keeps shape, dtype and device, is finite (also at 0) and odd; ``prox`` (where
    there is one: otherwise ``has_prox`` must be false) keeps shape and dtype, is finite,
    maps 0 to 0 and is odd for a separable penalty; the spec string round-trips.
    """
    spec = _spec(PENALTIES, cls_or_spec)
    for dtype in dtypes:
        _check_penalty_in(spec, lam, dtype)


def _check_penalty_in(spec: str, lam: float, dtype: torch.dtype) -> None:
    pen = create_penalty(spec, lam=lam)
    where = f"penalty {spec} ({dtype})"
    x = penalty_points(dtype)
    v = pen.value(x)
    _expect(isinstance(v, Tensor) and v.dim() == 0, f"{where}: value() must return a 0-dim tensor")
    _expect(v.dtype == dtype, f"{where}: value() returned {v.dtype}")
    _expect(bool(torch.isfinite(v)), f"{where}: value() is not finite")
    zero = pen.value(torch.zeros(5, dtype=dtype)).item()
    _expect(zero == 0, f"{where}: R(0) must be 0, got {zero}")
    torch.testing.assert_close(pen.value(-x), v, msg=lambda m: f"{where}: R must be even. {m}")
    # x is symmetric, so an odd part of R cancels in the sum above; one sign alone shows it
    pos = x[x > 0]
    torch.testing.assert_close(pen.value(-pos), pen.value(pos), msg=lambda m: f"{where}: R must be even. {m}")

    g = pen.subgradient(x)
    _expect(
        g.shape == x.shape and g.dtype == dtype and g.device == x.device,
        f"{where}: subgradient() must keep shape, dtype and device, "
        f"got {tuple(g.shape)} {g.dtype} {g.device}",
    )
    _expect(bool(torch.isfinite(g).all()), f"{where}: subgradient() is not finite")
    at_zero = pen.subgradient(torch.zeros(3, dtype=dtype))
    _expect(bool(torch.isfinite(at_zero).all()), f"{where}: subgradient(0) must be defined (finite)")
    torch.testing.assert_close(
        pen.subgradient(-x), -g, msg=lambda m: f"{where}: subgradient must be odd. {m}"
    )

    for step in PROX_STEPS:
        p = pen.prox(x, step)
        if p is None:
            _expect(not pen.has_prox, f"{where}: prox() returned None but has_prox is true")
            continue
        _expect(
            p.shape == x.shape and p.dtype == dtype,
            f"{where}: prox(step={step}) must keep shape and dtype, got {tuple(p.shape)} {p.dtype}",
        )
        _expect(bool(torch.isfinite(p).all()), f"{where}: prox(step={step}) is not finite")
        z = pen.prox(torch.zeros(4, dtype=dtype), step).abs().max().item()
        _expect(z == 0, f"{where}: prox(0, step={step}) must be 0, got {z}")
        if pen.separable:
            torch.testing.assert_close(
                pen.prox(-x, step), -p, msg=lambda m, s=step: f"{where}: prox(step={s}) must be odd. {m}"
            )
    again = PENALTIES.parse(pen.spec).options
    _expect(again == PENALTIES.parse(spec).options,
            f"{where}: spec {pen.spec!r} does not round-trip ({again})")


# --------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------
def build_arch(
    spec: str, shape: tuple[int, int, int] = ARCH_SHAPES[0], classes: int = _CLASSES, seed: int = 0
) -> nn.Module:
    """``create_arch`` under a fixed seed, in eval mode (what the arch checks test)."""
    torch.manual_seed(seed)
    return create_arch(spec, num_classes=classes, input_shape=shape).eval()


def _batch(shape: tuple[int, int, int]) -> Tensor:
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def check_arch_forward(
    cls_or_spec: str | type[nn.Module], shape: tuple[int, int, int] = ARCH_SHAPES[0]
) -> None:
    """Finite logits of shape (batch, classes), equal to the fx trace's; train mode works at batch 2."""
    spec = _spec(ARCHS, cls_or_spec)
    where = f"arch {spec} on {shape}"
    model = build_arch(spec, shape)
    x = _batch(shape)
    with torch.no_grad():
        out = model(x)
        try:
            traced = torch.fx.symbolic_trace(model)(x)
        except Exception as exc:
            raise AssertionError(
                f"{where}: torch.fx cannot trace the model ({type(exc).__name__}: {exc}); "
                f"slim prunes through the fx graph, so forward must not branch on tensor values"
            ) from exc
    _expect(out.shape == (2, _CLASSES), f"{where}: output shape {tuple(out.shape)}, expected (2, {_CLASSES})")
    _expect(bool(torch.isfinite(out).all()), f"{where}: output is not finite")
    _expect(torch.equal(traced, out), f"{where}: the fx-traced model computes something else than forward")
    model.train()  # batch statistics: must work on a batch of 2 as well
    train_out = model(x)
    _expect(train_out.shape == (2, _CLASSES) and bool(torch.isfinite(train_out).all()),
            f"{where}: training-mode output is {tuple(train_out.shape)} or not finite")


def check_arch_onnx(
    cls_or_spec: str | type[nn.Module], shape: tuple[int, int, int] = ARCH_SHAPES[0]
) -> None:
    """The ONNX export runs in onnxruntime and matches PyTorch (max diff ≤ 1e-4 × max |logit|)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            'check_arch_onnx needs onnxruntime: pip install "slim-prune[onnx]" '
            "(or call check_arch(..., onnx=False))"
        ) from None
    spec = _spec(ARCHS, cls_or_spec)
    model = build_arch(spec, shape)
    x = _batch(shape)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    with tempfile.TemporaryDirectory(prefix="slim-check-") as work:
        path = str(Path(work) / "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            try:  # the TorchScript exporter is much faster; fall back when a torch drops it
                torch.onnx.export(model, (x,), path, dynamo=False, **names)
            except Exception:
                torch.onnx.export(model, (x,), path, dynamo=True, **names)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    where = f"arch {spec} on {shape}"
    _expect(got.shape == want.shape, f"{where}: ONNX output shape {tuple(got.shape)} vs {tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    _expect(diff <= 1e-4 * want.abs().max().item(), f"{where}: ONNX differs from PyTorch by {diff:.3g}")


def _approx(value: float, expected: float, rel: float) -> bool:
    return abs(value - expected) <= max(rel * abs(expected), 1e-12)


def check_arch_init(cls_or_spec: str | type[nn.Module]) -> None:
    """BatchNorm layers exist with γ = 0.5, β = 0; convs feeding a BN have no bias; He / N(0, 0.01) init."""
    spec = _spec(ARCHS, cls_or_spec)
    where = f"arch {spec}"
    model = build_arch(spec)
    bns = [m for m in model.modules() if _is_bn(m)]
    _expect(bool(bns), f"{where}: has no BatchNorm layers, which network slimming needs")
    for bn in bns:
        _expect(bool(torch.all(bn.weight == 0.5) and torch.all(bn.bias == 0)),
                f"{where}: BN γ must start at 0.5 and β at 0 (slimcli.archs.init_weights does it)")
    modules = dict(model.named_modules())
    for node in torch.fx.symbolic_trace(model).graph.nodes:
        if node.op == "call_module" and _is_bn(modules[node.target]):
            producer = node.args[0]
            if producer.op == "call_module" and isinstance(modules[producer.target], nn.modules.conv._ConvNd):
                _expect(modules[producer.target].bias is None,
                        f"{where}: {producer.target} feeds BN {node.target} and must have no bias")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight.numel() >= 2000:
            fan_out = m.out_channels * math.prod(m.kernel_size) // m.groups
            std, want = m.weight.std().item(), math.sqrt(2 / fan_out)
            _expect(_approx(std, want, 0.15),
                    f"{where}: {name} weight std {std:.4g}, He init wants {want:.4g}")
        if isinstance(m, nn.Linear):
            _expect(m.bias is None or bool(torch.all(m.bias == 0)), f"{where}: {name} bias must start at 0")
            if m.weight.numel() >= 200:
                std = m.weight.std().item()
                _expect(_approx(std, 0.01, 0.25), f"{where}: {name} weight std {std:.4g}, N(0, 0.01) wanted")


def check_arch_stem(cls_or_spec: str | type[nn.Module]) -> None:
    """The input shape changes the input channels of the first layer only (same names, same other shapes)."""
    spec = _spec(ARCHS, cls_or_spec)
    rgb = build_arch(spec, (3, 32, 32)).state_dict()
    gray = build_arch(spec, (1, 28, 28)).state_dict()
    where = f"arch {spec}"
    _expect(list(rgb) == list(gray), f"{where}: parameter names depend on the input shape")
    differ = [k for k in rgb if rgb[k].shape != gray[k].shape]
    _expect(len(differ) == 1, f"{where}: 3×32×32 and 1×28×28 inputs change {differ}, expected the stem only")
    a, b = rgb[differ[0]].shape, gray[differ[0]].shape
    _expect(a[1] == 3 and b[1] == 1 and a[0] == b[0] and a[2:] == b[2:],
            f"{where}: {differ[0]} is {tuple(a)} vs {tuple(b)}; only its input channels may differ")


def check_arch_rebuild(cls_or_spec: str | type[nn.Module]) -> None:
    """A model rebuilt from the spec loads another's state dict strictly and computes the same outputs."""
    spec = _spec(ARCHS, cls_or_spec)
    a, b = build_arch(spec, seed=0), build_arch(spec, seed=1)
    x = _batch(ARCH_SHAPES[0])
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        _expect(torch.equal(a(x), b(x)),
                f"arch {spec}: a rebuilt model with loaded weights computes otherwise")


def check_arch(
    cls_or_spec: str | type[nn.Module],
    *,
    shapes: Sequence[tuple[int, int, int]] = ARCH_SHAPES,
    onnx: bool = True,
) -> None:
    """The whole architecture contract: every ``check_arch_*`` (ONNX unless ``onnx=False``), on ``shapes``."""
    spec = _spec(ARCHS, cls_or_spec)
    for shape in shapes:
        check_arch_forward(spec, shape)
        if onnx:
            check_arch_onnx(spec, shape)
    check_arch_init(spec)
    check_arch_stem(spec)
    check_arch_rebuild(spec)


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
def check_dataset(cls_or_spec: str | type[Dataset], root: str | Path | None = None) -> None:
    """The dataset contract; ``root`` is passed to ``load`` (where a file-based dataset finds its files).

    The attributes are consistent (classes, input shape, per-channel mean/std in (0, 1),
    augmentation settings), the spec string round-trips, both splits load as contiguous,
    writable uint8 N×C×H×W images with int64 labels in range, and an unknown split is a
    :class:`~slimcli.errors.UsageError` that says "split".
    """
    spec = _spec(DATASETS, cls_or_spec)
    root = Path(root) if root is not None else None
    ds = create_dataset(spec)
    where = f"dataset {spec}"
    _expect(isinstance(ds, Dataset) and ds.name == DATASETS.parse(spec).name,
            f"{where}: not a registered slimcli.data.Dataset")
    _expect(isinstance(ds.num_classes, int) and ds.num_classes >= 2,
            f"{where}: num_classes must be an int >= 2")
    _expect(isinstance(ds.input_shape, tuple) and len(ds.input_shape) == 3
            and all(isinstance(v, int) and v > 0 for v in ds.input_shape),
            f"{where}: input_shape must be a tuple (C, H, W) of positive ints, got {ds.input_shape!r}")
    _expect(isinstance(ds.classes, list) and len(ds.classes) == ds.num_classes
            and all(isinstance(c, str) and c for c in ds.classes) and len(set(ds.classes)) == ds.num_classes,
            f"{where}: classes must be a list of num_classes distinct non-empty names")
    channels = ds.input_shape[0]
    _expect(len(ds.mean) == len(ds.std) == channels, f"{where}: mean and std need one value per channel")
    _expect(all(0 < m < 1 for m in ds.mean) and all(0 < s < 1 for s in ds.std),
            f"{where}: mean and std are in [0, 1] pixel units, got {ds.mean} / {ds.std}")
    aug: Any = ds.augment
    _expect(isinstance(aug, dict) and set(aug) == {"crop_pad", "hflip"},
            f"{where}: augment must be {{'crop_pad': int, 'hflip': bool}}, got {aug!r}")
    _expect(isinstance(aug["crop_pad"], int) and aug["crop_pad"] >= 0 and isinstance(aug["hflip"], bool),
            f"{where}: augment must be {{'crop_pad': int >= 0, 'hflip': bool}}, got {aug!r}")
    _expect(create_dataset(ds.spec).spec == ds.spec, f"{where}: spec {ds.spec!r} does not round-trip")
    for split in ("train", "test"):
        x, y = ds.load(split, root)
        _expect(x.dtype == torch.uint8 and x.is_contiguous() and tuple(x.shape[1:]) == ds.input_shape,
                f"{where}: {split} images must be contiguous uint8 N×{'×'.join(map(str, ds.input_shape))}, "
                f"got {x.dtype} {tuple(x.shape)}")
        _expect(y.dtype == torch.int64 and y.shape == (len(x),) and len(x) > 0,
                f"{where}: {split} labels must be int64 of shape (N,) with N > 0, "
                f"got {y.dtype} {tuple(y.shape)} for {len(x)} images")
        _expect(0 <= int(y.min()) and int(y.max()) < ds.num_classes,
                f"{where}: {split} labels must be in [0, {ds.num_classes})")
        try:
            x[0, 0, 0, 0] = 1
        except RuntimeError as exc:
            raise AssertionError(f"{where}: {split} images must own writable memory ({exc})") from None
    try:
        ds.load("val", root)
    except UsageError as exc:
        _expect("split" in str(exc), f"{where}: the error for split 'val' must mention the split: {exc}")
    else:
        raise AssertionError(f"{where}: load('val') must raise slimcli.errors.UsageError (use check_split)")


__all__ = [
    "ARCH_SHAPES",
    "build_arch",
    "check_arch",
    "check_arch_forward",
    "check_arch_init",
    "check_arch_onnx",
    "check_arch_rebuild",
    "check_arch_stem",
    "check_dataset",
    "check_penalty",
    "penalty_points",
]
