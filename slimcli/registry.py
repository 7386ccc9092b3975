"""Plugin registries for penalties, architectures and datasets.

A plugin is a class decorated with ``@register_penalty("name")`` (or ``register_arch``,
``register_dataset``) that declares typed :class:`Option` s. Built-in plugins are the
modules listed in :data:`BUILTIN_PLUGINS`; third-party ones
come from the entry-point groups ``slim.penalties``, ``slim.archs``, ``slim.datasets``
(value: a module to import) and from files listed in ``SLIM_PLUGINS`` (separated by
``os.pathsep``: ``:`` on POSIX, ``;`` on Windows). All three paths go through the same
decorator and the same loader (:func:`load_plugin`), so a built-in is registered exactly
like a plugin someone else wrote, and a plugin that fails half-way registers nothing.

Spec strings name a plugin with options: ``NAME[:key=value[,key=value…]]``. A plugin that
declares ``positional = "OPTION"`` also takes that option's value without its key, right after
the name: ``NAME:VALUE[:key=value,…]`` (``timm:resnet18:drop_rate=0.1``). A registry built
with a ``file_loader`` (the architectures) also reads ``PATH.py:OBJECT[:key=value,…]``: an
object defined in a Python file (see :func:`file_spec_parts`).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from slimcli.errors import PluginError, UsageError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One typed option of a plugin.

    ``check`` is a predicate on the converted value and ``rule`` the human-readable range
    it enforces (shown in ``slim list`` and in the error when the check fails).
    """

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""

    def convert(self, raw: Any, plugin: str) -> Any:
        """Turn a spec-string value (or a Python value) into this option's type and validate it."""
        value = raw
        if self.default is None and (raw is None or (isinstance(raw, str) and raw.lower() == "none")):
            return None
        try:
            if isinstance(raw, str):
                if self.type is bool:
                    low = raw.strip().lower()
                    if low not in _TRUE | _FALSE:
                        raise ValueError(raw)
                    value = low in _TRUE
                elif self.type is int:
                    f = float(raw)
                    if not f.is_integer():
                        raise ValueError(raw)
                    value = int(f)
                else:
                    value = self.type(raw)
            elif self.type is float and isinstance(raw, int) and not isinstance(raw, bool):
                value = float(raw)
            elif self.type is int and isinstance(raw, float) and raw.is_integer():
                value = int(raw)
            if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
                raise ValueError(raw)
        except ValueError:
            raise UsageError(
                f"{plugin}: option '{self.name}' must be {self.describe_type()}, got {raw!r}"
            ) from None
        if self.type is float and value != value:  # NaN
            raise UsageError(f"{plugin}: option '{self.name}' must be a number, got NaN")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise UsageError(f"{plugin}: option '{self.name}' must be one of {allowed}; got {value!r}")
        if self.check is not None and not self.check(value):
            raise UsageError(
                f"{plugin}: option '{self.name}' must satisfy {self.rule or 'its check'}; got {value!r}"
            )
        return value

    def describe_type(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            self.type, self.type.__name__
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "help": self.help,
            "choices": list(self.choices) if self.choices is not None else None,
            "rule": self.rule or None,
        }


@dataclass
class PluginInfo:
    """What a registry knows about one plugin."""

    name: str
    cls: type
    kind: str
    source: str
    aliases: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def options(self) -> tuple[Option, ...]:
        return tuple(getattr(self.cls, "options", ()))

    @property
    def description(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "options": [o.as_dict() for o in self.options],
            "aliases": {k: v for k, v in self.aliases.items()},
            "source": self.source,
        }


@dataclass(frozen=True)
class Spec:
    """A parsed and validated spec string: the plugin and its complete option values."""

    name: str
    options: dict[str, Any]
    info: PluginInfo

    def __str__(self) -> str:
        """Canonical form: the positional value (if any), then every option that differs from its
        default, in declared order."""
        defaults = {o.name: o.default for o in self.info.options}
        positional = getattr(self.info.cls, "positional", None)
        head = self.name
        if positional and self.options.get(positional) is not None:
            head += ":" + _fmt(self.options[positional])
        parts = [f"{k}={_fmt(v)}" for k, v in self.options.items()
                 if defaults.get(k) != v and not (k == positional and head != self.name)]
        return head + (":" + ",".join(parts) if parts else "")


#: ``PATH.py[:OBJECT[:key=value,…]]``; the path ends at the first ``.py`` followed by ``:`` or the end.
_FILE_SPEC = re.compile(r"^(?P<path>.+?\.py)(?=:|$)(?::(?P<object>[^:]*))?(?::(?P<rest>.*))?$", re.DOTALL)


def file_spec_parts(spec: str) -> tuple[str, str, str] | None:
    """``(path, object, options)`` of a file spec ``PATH.py:OBJECT[:key=value,…]``, or ``None``
    when ``spec`` names a registered plugin instead (``object``/``options`` may be empty)."""
    m = _FILE_SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        return None
    return m["path"].strip(), (m["object"] or "").strip(), m["rest"] or ""


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names an object in a Python file rather than a registered plugin."""
    return file_spec_parts(spec) is not None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


class Registry:
    """A name → plugin-class table with spec-string parsing and validation."""

    def __init__(self, kind: str, group: str, package: str, file_loader: str | None = None) -> None:
        self.kind = kind  # "penalty", "arch", "dataset"
        self.group = group  # entry-point group
        self.package = package  # package of the built-ins (names the source of runtime registrations)
        # "module:function" reading file specs: function(path, object) -> (PluginInfo, preset
        # option values); imported on first use (it sits in a layer above this module)
        self.file_loader = file_loader
        self._plugins: dict[str, PluginInfo] = {}
        self._aliases: dict[str, tuple[str, dict[str, Any]]] = {}
        # What is being imported right now (names the source in listings and errors); None
        # outside load_plugins, where the class's module names it.
        self._loading: str | None = None

    @property
    def plural(self) -> str:
        return {"penalty": "penalties"}.get(self.kind, self.kind + "s")

    # registration -----------------------------------------------------------------
    def register(
        self, name: str, *, aliases: dict[str, dict[str, Any]] | None = None
    ) -> Callable[[type], type]:
        """Class decorator registering a plugin under ``name`` (and preset ``aliases``)."""

        def decorate(cls: type) -> type:
            source = self._loading or self._source_of(cls)
            for key in [name, *(aliases or {})]:
                if key in self._plugins or key in self._aliases:
                    raise PluginError(
                        f"{self.kind} '{key}' is registered twice "
                        f"(by {self._owner(key)} and {source}); rename one of them"
                    )
            cls.name = name
            self._plugins[name] = PluginInfo(name, cls, self.kind, source, dict(aliases or {}))
            for alias, preset in (aliases or {}).items():
                self._aliases[alias] = (name, dict(preset))
            return cls

        return decorate

    def unregister(self, name: str) -> None:
        """Remove a plugin and its aliases (for tests and interactive experiments)."""
        info = self._plugins.pop(name, None)
        if info:
            for alias in info.aliases:
                self._aliases.pop(alias, None)

    def _source_of(self, cls: type) -> str:
        module = cls.__module__
        if module == self.package or module.startswith(self.package + "."):
            return f"built-in {module}"
        return f"module {module}"

    def _owner(self, key: str) -> str:
        if key in self._plugins:
            return self._plugins[key].source
        return self._plugins[self._aliases[key][0]].source

    # lookup -----------------------------------------------------------------------
    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[PluginInfo]:
        load_plugins()
        return iter(sorted(self._plugins.values(), key=lambda p: p.name))

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._plugins or name in self._aliases

    def get(self, name: str) -> PluginInfo:
        """The plugin called ``name`` (aliases resolved), or a usage error with suggestions."""
        load_plugins()
        if name in self._plugins:
            return self._plugins[name]
        if name in self._aliases:
            return self._plugins[self._aliases[name][0]]
        known = sorted([*self._plugins, *self._aliases])
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(
            f"unknown {self.kind} '{name}'.{hint} Available: {', '.join(known) or 'none'} "
            f"(see 'slim list {self.plural}')"
        )

    def parse(self, spec: str | Spec, **overrides: Any) -> Spec:
        """Parse ``NAME[:k=v,…]`` into a validated :class:`Spec` (``overrides`` win over the string)."""
        if isinstance(spec, Spec):
            spec = str(spec)
        if not isinstance(spec, str) or not spec.strip():
            raise UsageError(f"empty {self.kind} spec; expected NAME[:key=value,…]")
        given: set[str] = set()  # keys from the string itself (they may override an alias preset)
        file_parts = file_spec_parts(spec)
        if file_parts is not None:
            if self.file_loader is None:
                raise UsageError(f"a {self.kind} cannot be read from a Python file spec ({spec.strip()!r}); "
                                 f"register it as a plugin (SLIM_PLUGINS=FILE) and name it")
            module, _, function = self.file_loader.partition(":")
            info, preset = getattr(importlib.import_module(module), function)(*file_parts[:2])
            raw: dict[str, Any] = dict(preset)
            rest = file_parts[2]
        else:
            name, _, rest = spec.strip().partition(":")
            name = name.strip()
            info = self.get(name)
            raw = dict(self._aliases[name][1]) if name in self._aliases else {}
            positional = getattr(info.cls, "positional", None)
            head, _, tail = rest.partition(":")
            if positional and "=" not in head:  # NAME:VALUE[:key=value,…]
                if head.strip():
                    raw[positional] = head.strip()
                    given.add(positional)
                rest = tail
        if rest.strip():
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq or not key:
                    raise UsageError(
                        f"{info.name}: cannot read option {item.strip()!r}; expected key=value "
                        f"(spec syntax NAME[:key=value,…])"
                    )
                if key in given:
                    raise UsageError(f"{info.name}: option '{key}' is given twice")
                given.add(key)
                raw[key] = value.strip()
        raw.update(overrides)
        return Spec(info.name, self._validate(info, raw), info)

    def _validate(self, info: PluginInfo, raw: dict[str, Any]) -> dict[str, Any]:
        opts = {o.name: o for o in info.options}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in opts:
                close = difflib.get_close_matches(key, list(opts), n=3, cutoff=0.5)
                hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                valid = ", ".join(
                    f"{o.name} ({o.describe_type()}, default {o.default})" for o in opts.values()
                )
                raise UsageError(
                    f"{info.name}: unknown option '{key}'.{hint} "
                    + (f"Valid options: {valid}" if valid else f"'{info.name}' takes no options")
                )
            values[key] = opts[key].convert(value, info.name)
        for o in info.options:
            values.setdefault(o.name, o.default)
        ordered = {o.name: values[o.name] for o in info.options}
        check = getattr(info.cls, "check_options", None)
        if check is not None:
            problem = check(ordered)
            if problem:
                raise UsageError(f"{info.name}: {problem}")
        return ordered

    def create(self, spec: str | Spec, *args: Any, **kwargs: Any) -> Any:
        """Instantiate the plugin named by ``spec``: ``cls(*args, **kwargs, **options)``."""
        parsed = self.parse(spec)
        return parsed.info.cls(*args, **kwargs, **parsed.options)


PENALTIES = Registry("penalty", "slim.penalties", "slimcli.penalties")
ARCHS = Registry("arch", "slim.archs", "slimcli.archs",
                 file_loader="slimcli.archs._userfile:load_file_arch")
DATASETS = Registry("dataset", "slim.datasets", "slimcli.data")
REGISTRIES = {"penalties": PENALTIES, "archs": ARCHS, "datasets": DATASETS}

register_penalty = PENALTIES.register
register_arch = ARCHS.register
register_dataset = DATASETS.register

#: The built-in plugins: imported by :func:`load_plugins` through the same function as
#: entry-point plugins (one module per plugin; a new built-in is one line here).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "slimcli.penalties.l1",
    "slimcli.penalties.lp",
    "slimcli.penalties.tl1",
    "slimcli.penalties.mcp",
    "slimcli.penalties.scad",
    "slimcli.penalties.l1l2",
    "slimcli.penalties.none",
    "slimcli.archs.vgg",
    "slimcli.archs.resnet164",
    "slimcli.archs.densenet40",
    "slimcli.archs.resnet56",
    "slimcli.archs.resnet50",
    "slimcli.archs.mobilenetv2",
    "slimcli.data.cifar",
    "slimcli.data.mnist",
    "slimcli.data.fashion_mini",
    "slimcli.data.synthetic",
    "slimcli.data.imagefolder",
)

_loaded = False
FAILED: list[tuple[str, str]] = []  # (plugin source, error) of plugins that did not load


def _warn_broken(source: str, exc: BaseException) -> None:
    FAILED.append((source, f"{type(exc).__name__}: {exc}"))
    warnings.warn(
        f"slim: plugin {source} failed to load and is skipped ({type(exc).__name__}: {exc})", stacklevel=3
    )


def autoload_disabled() -> bool:
    return os.environ.get("SLIM_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() in _TRUE


def _snapshot() -> dict[str, tuple[dict[str, PluginInfo], dict[str, tuple[str, dict[str, Any]]]]]:
    return {name: (dict(r._plugins), dict(r._aliases)) for name, r in REGISTRIES.items()}


def _restore(saved: dict[str, tuple[dict[str, PluginInfo], dict[str, tuple[str, dict[str, Any]]]]]) -> None:
    for name, (plugins, aliases) in saved.items():
        REGISTRIES[name]._plugins, REGISTRIES[name]._aliases = plugins, aliases


def load_plugin(source: str, load: Callable[[], object]) -> bool:
    """Run ``load`` (an import) with every registration attributed to ``source``, all or nothing.

    The one loader for built-ins, entry points and ``SLIM_PLUGINS`` files. If it raises,
    whatever it registered before failing is removed again (no half-filled registry) and the
    failure becomes a warning naming ``source``. Returns whether it loaded.
    """
    previous = {name: registry._loading for name, registry in REGISTRIES.items()}
    saved = _snapshot()
    for registry in REGISTRIES.values():  # one plugin module may register several kinds
        registry._loading = source
    try:
        load()
        return True
    except Exception as exc:  # a broken plugin must not break slim
        _restore(saved)
        _warn_broken(source, exc)
        return False
    finally:
        for name, registry in REGISTRIES.items():
            registry._loading = previous[name]


def load_plugins() -> None:
    """Import the built-ins, then entry-point plugins, then ``SLIM_PLUGINS`` files (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_PLUGINS:
        load_plugin(f"built-in {module}", functools.partial(importlib.import_module, module))
    if not autoload_disabled():
        for registry in REGISTRIES.values():
            for ep in entry_points(group=registry.group):
                source = f"'{ep.name}' (entry point {ep.value}, {registry.group})"
                load_plugin(source, functools.partial(importlib.import_module, ep.value))
    for path in filter(None, os.environ.get("SLIM_PLUGINS", "").split(os.pathsep)):
        load_plugin_file(path)


def _exec_file(p: Path) -> None:
    if not p.is_file():
        raise FileNotFoundError(f"no such file (from SLIM_PLUGINS): {p}")
    modname = f"slim_local_plugin_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(modname, p)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {p}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(modname, None)
        raise


def load_plugin_file(path: str | os.PathLike[str]) -> bool:
    """Import one local plugin file (as ``SLIM_PLUGINS`` does); failures are warnings."""
    p = Path(path).expanduser()
    return load_plugin(f"file {p}", functools.partial(_exec_file, p))
