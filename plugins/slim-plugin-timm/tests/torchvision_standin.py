"""A minimal stand-in for torchvision, for these tests ONLY, used only where the real torchvision
does not import (here: a CUDA torchvision wheel next to a CPU torch raises RuntimeError on import).

It provides exactly the names timm touches when it is imported — module objects plus
``datasets.{CIFAR10, CIFAR100, MNIST, KMNIST, FashionMNIST, ImageFolder}``,
``transforms.ToTensor``, ``transforms.functional.InterpolationMode`` and
``ops.misc.FrozenBatchNorm2d`` — as inert placeholders. None of them is used to build a model:
timm's models are plain torch, and the stand-in is removed from ``sys.modules`` again right after
``import timm``. With a working torchvision the stand-in is never installed.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import sys
import types
from collections.abc import Iterator

import torch

NAMES = {
    "torchvision.datasets": ("CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"),
    "torchvision.transforms": ("ToTensor",),
}


class InterpolationMode(enum.Enum):
    """torchvision.transforms.functional.InterpolationMode's members (timm maps them to strings)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class FrozenBatchNorm2d(torch.nn.Module):
    """Placeholder: timm imports the name (for its freeze utilities), building a model never uses it."""


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so that submodule imports resolve in sys.modules
    module.__dict__.update(attrs)
    return module


def standin_modules() -> dict[str, types.ModuleType]:
    mods = {"torchvision": _module("torchvision", __version__="0.0-standin")}
    for name, classes in NAMES.items():
        mods[name] = _module(name, **{c: type(c, (), {}) for c in classes})
    mods["torchvision.transforms.functional"] = _module("torchvision.transforms.functional",
                                                        InterpolationMode=InterpolationMode)
    mods["torchvision.ops"] = _module("torchvision.ops")
    mods["torchvision.ops.misc"] = _module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
    for name, module in mods.items():  # parent.child attributes
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, module)
    return mods


def torchvision_imports() -> bool:
    """Whether the real torchvision imports (leaves nothing half-imported behind when not)."""
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # ImportError, or RuntimeError from a torchvision built for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


@contextlib.contextmanager
def standin_torchvision() -> Iterator[bool]:
    """Within the block, ``import torchvision`` gives the stand-in if the real one does not import;
    yields whether the stand-in is in use. Afterwards sys.modules is as before."""
    if torchvision_imports():
        yield False
        return
    mods = standin_modules()
    sys.modules.update(mods)
    try:
        yield True
    finally:
        for name in mods:
            sys.modules.pop(name, None)
