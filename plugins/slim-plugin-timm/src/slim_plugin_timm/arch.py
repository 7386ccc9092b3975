"""``timm:NAME[:key=value,…]``: any model of timm (PyTorch Image Models) as a slim architecture.

The model is built untrained by ``timm.create_model(NAME, pretrained=False,
num_classes=…, in_chans=C, …)`` for the dataset's classes and channels; pretrained weights are
never downloaded. timm itself is imported only when a timm model is named, so this module
loads (and ``slim list archs`` works) where timm is missing or does not import.
"""

from __future__ import annotations

import difflib
import importlib
import math
from types import ModuleType
from typing import Any, ClassVar

from torch import nn

from slimcli.errors import PluginError
from slimcli.registry import Option, register_arch


def import_timm() -> ModuleType:
    """``import timm``, or a :class:`PluginError` that says why not and what to do."""
    try:
        return importlib.import_module("timm")
    except Exception as exc:  # ImportError, or RuntimeError from a torchvision built for another torch
        first = (str(exc).splitlines() or [""])[0]
        raise PluginError(
            f"timm does not import here ({type(exc).__name__}: {first}); install timm with a torchvision "
            f"built for this torch (pip install timm torchvision; for a CPU-only torch, torchvision from "
            f"the same index as torch)"
        ) from None


def _rate(value: float) -> bool:
    return 0 <= value < 1 and math.isfinite(value)


@register_arch("timm")
class Timm(nn.Module):
    """Any timm model by name, untrained: timm:NAME (e.g. timm:mobilenetv2_100); needs timm."""

    #: ``timm:NAME`` is ``timm:model=NAME``
    positional: ClassVar[str] = "model"
    options: ClassVar[tuple[Option, ...]] = (
        Option("model", str, None, "timm model name (timm.list_models())"),
        Option("drop_rate", float, 0.0, "dropout before the classifier", check=_rate,
               rule="0 <= drop_rate < 1"),
        Option("drop_path_rate", float, 0.0, "stochastic depth (models that have it)", check=_rate,
               rule="0 <= drop_path_rate < 1"),
    )

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> str | None:
        name = values.get("model")
        if not name:
            return "name a model: timm:NAME, e.g. timm:mobilenetv2_100 (timm.list_models() lists them)"
        timm = import_timm()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            return f"no model {name!r} in timm {timm.__version__}.{hint} (timm.list_models() lists them)"
        return None

    def __new__(  # type: ignore[misc]
        cls, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 224, 224),
        model: str | None = None, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
    ) -> nn.Module:
        """Build and return the timm model itself (not a wrapper: its state-dict keys are timm's)."""
        problem = cls.check_options({"model": model})
        if problem:
            raise PluginError(f"timm: {problem}")
        timm = import_timm()
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}  # not every model takes it
        try:
            net = timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=input_shape[0],
                                    drop_rate=drop_rate, **extra)
        except TypeError as exc:
            raise PluginError(f"timm:{model}: {exc}") from None
        net.input_shape = tuple(int(s) for s in input_shape)  # the example input slim traces and measures
        return net
