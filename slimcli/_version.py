"""The package version, in a module that imports nothing (``slim --version`` stays instant)."""

__version__ = "0.1.0"
