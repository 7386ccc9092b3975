"""Helpers shared by the command modules: consoles, spec-string validation at the edge."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from slimcli.errors import UsageError
from slimcli.registry import Registry

#: Results and tables go to stdout; progress and logs to stderr (so --json stays clean).
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def spec_callback(registry: Registry) -> Callable[[str | None], str | None]:
    """A Typer callback that validates a spec string and returns its canonical form."""

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(registry.parse(value))
        except UsageError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


def device_callback(value: str) -> str:
    """A Typer callback that checks a ``--device`` string (auto, cpu, cuda, cuda:N)."""
    from slimcli.train.device import check_device_string  # lazily: start-up cost, see docs/benchmarks.md

    try:
        return check_device_string(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--device ")) from None


def library_check(module: str, name: str) -> Callable[[Any], Any]:
    """A Typer callback running the library's own validator ``module.name`` (e.g.
    ``slimcli.prune.rules.check_min_channels``), so an option is checked by the same code as
    the library call it feeds; its :class:`UsageError` becomes the option's usage error (exit 2).
    The module is imported when the callback runs, not at start-up (it imports torch)."""

    def check(value: Any) -> Any:
        if value is None:  # an optional option that was not given
            return None
        validate = getattr(importlib.import_module(module), name)
        try:
            return validate(value)
        except UsageError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


def positive(value: float) -> float:
    """A Typer callback: a finite number > 0 (learning rates, tolerances)."""
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a number > 0, got {value}")
    return value


def non_negative(value: float) -> float:
    """A Typer callback: a finite number >= 0 (λ, momentum, image and epoch counts, seeds)."""
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a number >= 0, got {value}")
    return value



def one_of(*choices: str) -> Callable[[str | None], str | None]:
    """A Typer callback that accepts one of ``choices`` (or None: the option was not given)."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


# The pruning options slim prune, inspect and sweep share (values as slimcli.prune.groups.COUPLINGS
# and slimcli.prune.surgery.SELECTIONS, spelled here so --help imports no torch).
CouplingOption = Annotated[str | None, typer.Option(
    "--coupling", callback=one_of("auto", "joint", "select"), show_default=False,
    help="How BatchNorms whose channels are tied (residual sums, depthwise and grouped convs, products, "
         "shuffles) are pruned: auto = jointly as one group scored by the mean |γ| of its members (see "
         "--group-score of slim prune), with a channel selection in front of a BN that reads a residual "
         "sum or a concatenation (the paper's ResNet-164/DenseNet rule); joint = groups only, never a "
         "selection; select = each BN alone (tied BNs stay whole). [default: auto; a pruned checkpoint "
         "keeps the coupling it was pruned with]")]
SelectionsOption = Annotated[str, typer.Option(
    "--selections", callback=one_of("auto", "gather", "zero"),
    help="How a BN that reads a shared tensor (a selection in --coupling auto/select) loses channels: "
         "gather = network slimming's channel selection in front (an ONNX Gather; the paper's parameter "
         "counts); zero = it keeps its width with γ = β = 0 on the pruned channels (exact, no gather, the "
         "next layer keeps its inputs); auto = a gather only where it saves enough MACs per copied element "
         "(docs/pruning.md).")]
RoundToOption = Annotated[int, typer.Option(
    "--round-to", metavar="N", min=1, max=4096,
    help="Kept channel counts become multiples of N (adding back the largest-|γ| channels; a layer "
         "narrower than N stays whole). 8 or 16 let CPU runtimes use their blocked conv kernels.")]
