"""Hermetic tests: no entry-point autoload, no network, few threads."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["SLIM_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.pop("SLIM_PLUGINS", None)
os.environ.pop("SLIM_DATA", None)

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket is a test bug."""
    import socket

    def guard(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", guard)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models gain nothing from threads, and on a shared busy CPU OpenMP spin-waiting with
    2 threads is up to ~10× slower; one thread also makes runs comparable with 1-thread
    subprocesses.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def noprox_penalty() -> Iterator[str]:
    """The name of a penalty registered for the test that has no proximal map."""
    from slimcli.penalties import Penalty
    from slimcli.registry import PENALTIES, register_penalty

    @register_penalty("test-noprox")
    class NoProx(Penalty):
        """A penalty without a proximal map."""

        def value(self, x: torch.Tensor) -> torch.Tensor:
            return x.abs().sum()

        def subgradient(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sign(x)

    try:
        yield "test-noprox"
    finally:
        PENALTIES.unregister("test-noprox")


@pytest.fixture(autouse=True)
def _short_form_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """slim export times its candidate forms for seconds; tests time them for the minimum rounds."""
    from slimcli.export import choose

    monkeypatch.setattr(choose, "BUDGET_S", 0.0)
