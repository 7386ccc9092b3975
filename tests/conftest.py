"""Hermetic tests: no entry-point autoload, no network, few threads."""

from __future__ import annotations

import os

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
