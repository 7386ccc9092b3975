"""User architectures: a class or factory of the user's own, without writing a plugin.

``--arch path/to/net.py:Net[:key=value,…]`` (anywhere an arch spec is accepted) imports the
file and builds ``Net``; from Python, :func:`slimcli.create_arch` also takes the class or
factory itself, and :func:`arch_spec` gives the spec string of one defined in a file.

The constructor convention (docs/architectures.md, "Your own model"):

- ``num_classes``, ``input_shape`` (a ``(C, H, W)`` tuple) and ``in_channels`` (``C``) are
  passed as keyword arguments, each only if the callable's signature names that parameter;
- every other parameter that can be passed by keyword is an option, ``key=value`` in the spec.
  A value is converted to the parameter's annotated type when that is ``int``, ``float``,
  ``bool`` or ``str`` (``X | None`` too), else to the type of its default when that is one of
  these; otherwise by the literal rule: ``true``/``false`` → bool, ``none`` → None, an integer
  → int, a number → float, anything else → the text. A parameter without a default must be
  given;
- the callable must return an ``nn.Module``; its ``forward`` must be traceable by torch.fx.

The canonical spec (what checkpoints record) holds the absolute path of the file and the
sha256 of its bytes: ``/abs/net.py:Net:width=8,sha256=…``. Rebuilding from a spec whose sha256
is not the file's any more warns (the model is built from the file as it is now; if its
weights no longer fit, loading the checkpoint fails and says so).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimcli.errors import PluginError, SlimError, UsageError
from slimcli.registry import Option, PluginInfo

#: keyword arguments slim passes itself (when the signature names them)
PASSED = ("num_classes", "input_shape", "in_channels")
#: the option of a file spec that records the file's sha256 (reserved: not passed on)
SHA_OPTION = "sha256"

_SIMPLE = (bool, int, float, str)
_MISSING_DOC = "A user architecture."


@dataclass(frozen=True)
class LiteralOption(Option):
    """An option of an unannotated parameter: ``true``/``false``, ``none``, int, float or text."""

    def convert(self, raw: Any, plugin: str) -> Any:
        if not isinstance(raw, str):
            return raw  # a Python value (create_arch(Net, depth=...)) is passed as it is
        text = raw.strip()
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low == "none":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    def describe_type(self) -> str:
        return "true/false, none, a number or text"


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


_SHA = Option(SHA_OPTION, str, None, "sha256 of the file's bytes (recorded; checked when rebuilt)",
              check=_is_sha256, rule="64 lowercase hex digits")


def _simple_type(annotation: Any) -> type | None:
    """``int``/``float``/``bool``/``str`` of an annotation (``X | None`` and strings too), else None."""
    if isinstance(annotation, str):  # postponed evaluation that could not be resolved
        names = {n.strip() for n in annotation.split("|")} - {"None"}
        if annotation.startswith("Optional[") and annotation.endswith("]"):
            names = {annotation[9:-1].strip()}
        found = [t for t in _SIMPLE if t.__name__ in names]
        return found[0] if len(found) == 1 and len(names) == 1 else None
    if annotation in _SIMPLE:
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if (origin is typing.Union or origin is types.UnionType) and len(args) == 1 and args[0] in _SIMPLE:
        return args[0]
    return None


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    target = func.__init__ if isinstance(func, type) else func  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: fall back to the raw strings
        return {}


class UserArch:
    """A user's class or factory seen as an architecture plugin (the ``cls`` of its PluginInfo).

    Calling it as ``(num_classes, input_shape, **options)`` — what :func:`create_arch` does
    with every arch — builds the model following the convention in the module docstring.
    """

    positional = None

    def __init__(self, factory: Callable[..., Any], label: str, sha256: str | None = None,
                 path: Path | None = None) -> None:
        self.factory, self.label, self.sha256, self.path = factory, label, sha256, path
        self.name = label
        doc = (inspect.getdoc(factory) or "").strip()
        self.__doc__ = doc.splitlines()[0] if doc else _MISSING_DOC
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            raise UsageError(f"{label}: cannot read its signature; pass a class or a def function") from None
        hints = _hints(factory)
        self.passes: set[str] = set()
        self.required: list[str] = []
        options: list[Option] = []
        for p in signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name in PASSED:
                if p.kind is p.POSITIONAL_ONLY:
                    raise UsageError(f"{label}: slim passes '{p.name}' by keyword; make it an ordinary "
                                     f"parameter (not positional-only)")
                self.passes.add(p.name)
                continue
            if p.kind is p.POSITIONAL_ONLY:
                if p.default is p.empty:
                    raise UsageError(f"{label}: parameter '{p.name}' is positional-only and has no default; "
                                     f"slim passes options by keyword")
                continue
            if p.name == SHA_OPTION:
                raise UsageError(f"{label}: a parameter may not be called '{SHA_OPTION}' (slim records the "
                                 f"file's hash under that name); rename it")
            default = None if p.default is p.empty else p.default
            kind = _simple_type(hints.get(p.name, p.annotation if p.annotation is not p.empty else None))
            if kind is None and type(default) in _SIMPLE:
                kind = type(default)
            if p.default is p.empty:
                self.required.append(p.name)
            if kind is None:
                options.append(LiteralOption(p.name, object, default, "a parameter of the user's callable"))
            else:
                options.append(Option(p.name, kind, default, "a parameter of the user's callable"))
        if path is not None:
            options.append(_SHA)
        self.options = tuple(options)

    def check_options(self, values: dict[str, Any]) -> str | None:
        """Missing required parameters are an error; a recorded sha256 that is not the file's warns."""
        missing = [n for n in self.required if values.get(n) is None]
        if missing:
            example = ",".join(f"{n}=…" for n in missing)
            return f"needs {', '.join(repr(n) for n in missing)} (no default): {self.label}:{example}"
        recorded = values.get(SHA_OPTION)
        if self.sha256 and recorded and recorded != self.sha256:
            warnings.warn(
                f"slim: arch file {self.path} changed since this spec was recorded (sha256 {recorded[:12]}… "
                f"then, {self.sha256[:12]}… now); the model is built from the file as it is now",
                stacklevel=2,
            )
        return None

    def validate(self, values: dict[str, Any]) -> dict[str, Any]:
        """Convert and check Python option values as a spec string's are (for create_arch(callable))."""
        opts = {o.name: o for o in self.options}
        unknown = [k for k in values if k not in opts]
        if unknown:
            valid = ", ".join(opts) or "none"
            raise UsageError(f"{self.label}: unknown option {unknown[0]!r}; its parameters are: {valid}")
        out = {o.name: o.convert(values[o.name], self.label) if o.name in values else o.default
               for o in self.options}
        problem = self.check_options(out)
        if problem:
            raise UsageError(f"{self.label}: {problem}")
        return out

    def __call__(self, num_classes: int, input_shape: tuple[int, int, int], **options: Any) -> nn.Module:
        options.pop(SHA_OPTION, None)
        given = {"num_classes": num_classes, "input_shape": tuple(input_shape), "in_channels": input_shape[0]}
        kwargs = {k: v for k, v in given.items() if k in self.passes}
        kwargs.update(options)  # an option left out has the parameter's own default as its value
        try:
            model = self.factory(**kwargs)
        except (MemoryError, SlimError):
            raise
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "allocate" in str(exc):
                raise  # create_arch turns it into its "not enough memory" error
            raise PluginError(f"building {self.label} failed: {_describe(exc, self.path)}") from exc
        if not isinstance(model, nn.Module):
            raise PluginError(f"{self.label} returned {type(model).__name__}, not a torch.nn.Module; "
                              f"return the model (an nn.Module instance)")
        return model


def _describe(exc: BaseException, path: Path | None) -> str:
    """``Type: message (at file:line)`` with the innermost frame in the user's file (or the last)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if path is not None and Path(f.filename) == path] or frames[-1:]
    where = f" (at {mine[-1].filename}:{mine[-1].lineno})" if mine else ""
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f" (at {exc.filename}:{exc.lineno})"
        return f"SyntaxError: {exc.msg}{where}"
    return f"{type(exc).__name__}: {exc}{where}"


_MODULES: dict[tuple[Path, str], types.ModuleType] = {}


def _import_file(path: Path, source: bytes, sha: str) -> types.ModuleType:
    """Run ``source`` (the bytes that were hashed) as the module of ``path``, once per (path,
    content): no bytecode cache is read or written, so the code run is the code recorded. The
    file's folder is on sys.path meanwhile (sibling imports such as ``from blocks import Block``)."""
    key = (path, sha)
    if key in _MODULES:
        return _MODULES[key]
    modname = f"slim_user_arch_{sha[:16]}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None:
        raise PluginError(f"cannot import arch file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module  # dataclasses, pickling and torch.fx look modules up by name
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
    except BaseException as exc:
        sys.modules.pop(modname, None)
        if not isinstance(exc, Exception):
            raise
        raise PluginError(f"arch file {path} failed to import: {_describe(exc, path)}") from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    _MODULES[key] = module
    return module


def _candidates(module: types.ModuleType) -> list[str]:
    """Classes (nn.Module subclasses) and functions defined in the module itself."""
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if (isinstance(obj, type) and issubclass(obj, nn.Module)) or inspect.isfunction(obj):
            names.append(name)
    return names


def load_file_arch(path_text: str, obj: str) -> tuple[PluginInfo, dict[str, Any]]:
    """The registry's file loader: ``PATH.py`` and ``OBJECT`` → (PluginInfo, preset values).

    The PluginInfo's name is ``/absolute/PATH.py:OBJECT``; the preset records the file's
    current sha256 (a sha256 given in the spec wins, and warns if it differs).
    """
    path = Path(path_text).expanduser()
    shown = f"{path_text}:{obj}" if obj else path_text
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        if path.is_absolute():  # typically a spec recorded in a checkpoint
            raise UsageError(f"arch file {path} {what}; a recorded spec names the file by its absolute "
                             f"path, so put the file back there")
        raise UsageError(f"arch file {path} (relative to the current folder {Path.cwd()}) {what}; "
                         f"expected PATH.py:CLASS_OR_FUNCTION")
    path = path.resolve()
    source = path.read_bytes()
    sha = hashlib.sha256(source).hexdigest()
    module = _import_file(path, source, sha)
    found = ", ".join(_candidates(module)) or "no nn.Module classes or functions"
    if not obj:
        raise UsageError(f"{shown}: name the class or function that builds the model, as "
                         f"{path_text}:NAME (the file defines: {found})")
    target: Any = module
    for part in obj.split("."):
        if not part.isidentifier() or not hasattr(target, part):
            raise UsageError(f"{shown}: the file has no {obj!r} (it defines: {found})")
        target = getattr(target, part)
    if isinstance(target, type) and not issubclass(target, nn.Module):
        raise UsageError(f"{shown}: {obj} is a class but not a torch.nn.Module subclass; name the model's "
                         f"class or a function that returns the model")
    if not callable(target):
        raise UsageError(f"{shown}: {obj} is a {type(target).__name__}, not a class or function")
    label = f"{path}:{obj}"
    arch = UserArch(target, label, sha256=sha, path=path)
    info = PluginInfo(label, arch, "arch", f"file {path}")  # type: ignore[arg-type]
    return info, {SHA_OPTION: sha}


def from_callable(factory: Callable[..., Any]) -> UserArch:
    """A class or factory given from Python (``create_arch(Net, …)``)."""
    if isinstance(factory, type) and not issubclass(factory, nn.Module):
        raise UsageError(f"{factory.__qualname__} is a class but not a torch.nn.Module subclass")
    if not callable(factory):
        raise UsageError(f"expected an arch spec string, an nn.Module class or a function; got "
                         f"{type(factory).__name__}")
    label = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
    return UserArch(factory, label)


def arch_spec(factory: Callable[..., Any], **options: Any) -> str:
    """The canonical file spec of a class or function defined at the top level of a ``.py`` file,
    e.g. to train it with ``TrainConfig(arch=arch_spec(Net, width=8))`` or on the command line."""
    qualname = getattr(factory, "__qualname__", "")
    try:
        source = inspect.getsourcefile(factory)  # type: ignore[arg-type]
    except TypeError:
        source = None
    if not source or not source.endswith(".py") or "<locals>" in qualname:
        raise UsageError(f"{qualname or factory!r} is not defined at the top level of a .py file; "
                         f"move it to one (the spec names FILE.py:NAME)")
    from slimcli.registry import ARCHS

    return str(ARCHS.parse(f"{Path(source).resolve()}:{qualname}", **options))


__all__ = [
    "PASSED", "SHA_OPTION", "LiteralOption", "UserArch", "arch_spec", "from_callable", "load_file_arch",
]
