"""Network architectures: one plugin module per architecture.

Each architecture is an ``nn.Module`` subclass registered with ``@register_arch`` and
constructed as ``cls(num_classes, input_shape, **options)``. The contract every built-in
and third-party architecture follows (and ``tests/test_archs.py`` checks):

- conv layers that feed a BatchNorm have no bias (the BN shift replaces it);
- weights start from :func:`init_weights`: conv He-normal (fan-out), BN γ = 0.5 and β = 0,
  Linear N(0, 0.01) with zero bias — the network-slimming reference initialisation;
- ``forward`` has no data-dependent Python control flow, so ``torch.fx.symbolic_trace``
  (the pruning engine) and ONNX export work;
- only the stem's input channels depend on ``input_shape``; the classifier reads an
  adaptive global average pool, so parameter counts do not depend on the image size.

The public entry point is :func:`create_arch`; it also builds a user's own model from a file
spec ``PATH.py:OBJECT[:k=v,…]`` or from the class or factory itself (:mod:`slimcli.archs._userfile`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from slimcli.errors import SlimError, UsageError
from slimcli.registry import ARCHS, Spec

#: γ of every BatchNorm at construction (network slimming starts from 0.5, not 1).
GAMMA_INIT = 0.5


def init_weights(model: nn.Module, gamma: float = GAMMA_INIT) -> None:
    """Initialise every conv, BatchNorm and Linear of ``model`` the network-slimming way."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            # He-normal over fan-out = out_channels·k·k, as the reference code's N(0, √(2/n))
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                nn.init.constant_(m.weight, gamma)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_input_shape(arch: str, input_shape: Sequence[int], min_size: int = 1) -> tuple[int, int, int]:
    """Validate ``input_shape`` as (C, H, W) with H, W ≥ ``min_size``; return it as a tuple."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise UsageError(f"{arch}: input_shape must be (channels, height, width) with positive sizes, "
                         f"got {tuple(input_shape)}")
    if min(shape[1:]) < min_size:
        raise UsageError(f"{arch}: images must be at least {min_size}×{min_size} pixels "
                         f"(it downsamples that much), got {shape[1]}×{shape[2]}")
    return shape  # type: ignore[return-value]


def check_num_classes(arch: str, num_classes: int) -> int:
    """Validate the number of classes (≥ 2: a classifier needs at least two outputs)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UsageError(f"{arch}: num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def validate_options(cls: type, values: dict[str, Any]) -> None:
    """Check option values as a spec string would be checked: each :class:`Option`, then
    ``cls.check_options``. Architectures call this from ``__init__`` so that a direct
    construction is validated too."""
    name = getattr(cls, "name", cls.__name__)
    for opt in getattr(cls, "options", ()):
        if opt.name in values:
            opt.convert(values[opt.name], name)
    check = getattr(cls, "check_options", None)
    problem = check(values) if check is not None else None
    if problem:
        raise UsageError(f"{name}: {problem}")


def depth_problem(depth: int, step: int, offset: int) -> str | None:
    """The message for a depth that is not step·n + offset with n ≥ 1, else ``None``."""
    if depth >= step + offset and (depth - offset) % step == 0:
        return None
    examples = ", ".join(str(step * n + offset) for n in range(1, 4))
    return f"depth must be {step}n+{offset} with n >= 1 ({examples}, …), got {depth}"


def create_arch(
    spec: str | Spec | Callable[..., nn.Module], num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32), **options: Any,
) -> nn.Module:
    """Build the dense model named by ``spec``.

    ``spec`` is a spec string — a registered arch ``NAME[:k=v,…]`` (``vgg19:width=0.5``) or a
    user file ``PATH.py:OBJECT[:k=v,…]`` — or a user's ``nn.Module`` class or factory function
    itself (see :mod:`slimcli.archs._userfile` for the constructor convention). ``options``
    override the spec string's (or are the callable's options), checked the same way.
    """
    if isinstance(spec, (str, Spec)):
        parsed = ARCHS.parse(spec, **options)
        name, build, values = parsed.name, parsed.info.cls, parsed.options
        shown = str(parsed)
    else:
        from slimcli.archs._userfile import from_callable  # user code: see docs/architectures.md

        build = from_callable(spec)
        name, values = build.label, build.validate(options)
        shown = name
    check_num_classes(name, num_classes)
    shape = check_input_shape(name, input_shape)
    try:
        return build(num_classes, shape, **values)
    except (MemoryError, RuntimeError) as exc:
        # e.g. vgg19:width=100 (meant as 100 %): torch's CPU allocator fails with a RuntimeError
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
            raise
        size = re.search(r"allocate (\d+) bytes", str(exc))
        need = f" (one of its tensors alone needs {int(size[1]) / 2**30:,.1f} GiB)" if size else ""
        raise SlimError(f"not enough memory to build {shown}{need}; choose a smaller width or depth "
                        f"(slim list archs)") from None


def arch_spec(factory: Callable[..., nn.Module], **options: Any) -> str:
    """The canonical spec (``/abs/FILE.py:NAME[:k=v,…],sha256=…``) of a class or function defined
    at the top level of a ``.py`` file, e.g. for ``TrainConfig(arch=arch_spec(Net, width=8))``."""
    from slimcli.archs._userfile import arch_spec as spec_of

    return spec_of(factory, **options)


__all__ = [
    "GAMMA_INIT",
    "arch_spec",
    "check_input_shape",
    "check_num_classes",
    "create_arch",
    "depth_problem",
    "init_weights",
    "validate_options",
]
