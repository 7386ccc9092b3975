"""Plugin registries: spec strings, typed options, aliases, duplicates, loading plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from slimcli.errors import PluginError, UsageError
from slimcli.registry import ARCHS, DATASETS, PENALTIES, REGISTRIES, Option, Registry, Spec


@pytest.fixture
def reg() -> Registry:
    """A private registry (not one of the three global ones) with two plugins."""
    r = Registry("widget", "slim.widgets", "slimcli_no_such_package")

    @r.register("gizmo", aliases={"gizmo-big": {"size": 8, "mode": "fast"}})
    class Gizmo:
        """A gizmo with every option type."""

        options = (
            Option("size", int, 2, "how big", check=lambda v: v >= 1, rule="size >= 1"),
            Option("rate", float, 0.5, "how fast", check=lambda v: 0 < v <= 1, rule="0 < rate <= 1"),
            Option("loud", bool, False, "make noise"),
            Option("mode", str, "slow", "pace", choices=("slow", "fast")),
            Option("cap", float, None, "optional cap (none = no cap)"),
        )

        @classmethod
        def check_options(cls, values: dict[str, Any]) -> str | None:
            if values["cap"] is not None and values["cap"] < values["rate"]:
                return "cap must be >= rate"
            return None

        def __init__(self, tag: str = "", **options: Any) -> None:
            self.tag = tag
            self.options_given = options

    @r.register("plain")
    class Plain:
        """No options at all."""

    return r


# ------------------------------------------------------------------------------ option types
def test_option_types_convert(reg: Registry) -> None:
    s = reg.parse("gizmo:size=3,rate=1e-1,loud=yes,mode=fast,cap=0.75")
    assert s.options == {"size": 3, "rate": 0.1, "loud": True, "mode": "fast", "cap": 0.75}
    assert type(s.options["size"]) is int and type(s.options["rate"]) is float
    assert reg.parse("gizmo:size=4.0").options["size"] == 4  # an integral float is an int
    assert reg.parse("gizmo:rate=1").options["rate"] == 1.0
    for text, value in [
        ("true", True),
        ("1", True),
        ("on", True),
        ("FALSE", False),
        ("0", False),
        ("no", False),
    ]:
        assert reg.parse(f"gizmo:loud={text}").options["loud"] is value
    assert reg.parse("gizmo:cap=none").options["cap"] is None
    assert reg.parse(" gizmo : size = 5 ").options["size"] == 5  # whitespace is tolerated


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("gizmo:size=2.5", "'size' must be an integer, got '2.5'"),
        ("gizmo:size=abc", "'size' must be an integer"),
        ("gizmo:size=0", "'size' must satisfy size >= 1; got 0"),
        ("gizmo:rate=fast", "'rate' must be a number"),
        ("gizmo:rate=nan", "NaN"),
        ("gizmo:rate=2", "must satisfy 0 < rate <= 1"),
        ("gizmo:loud=maybe", "'loud' must be true or false"),
        ("gizmo:mode=medium", "'mode' must be one of slow, fast; got 'medium'"),
        ("gizmo:cap=0.1", "gizmo: cap must be >= rate"),
        ("gizmo:size=2,size=3", "'size' is given twice"),
        ("gizmo:size", "cannot read option 'size'; expected key=value"),
        ("gizmo:=3", "expected key=value"),
        ("", "empty widget spec"),
    ],
)
def test_bad_option_values_are_usage_errors(reg: Registry, spec: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        reg.parse(spec)
    assert needle in str(info.value)
    assert info.value.exit_code == 2


def test_python_values_are_checked_like_strings(reg: Registry) -> None:
    assert reg.parse("gizmo", size=7, rate=1).options["size"] == 7
    with pytest.raises(UsageError, match="'size' must be an integer"):
        reg.parse("gizmo", size=True)  # a bool is not an int here
    with pytest.raises(UsageError, match="'size' must be an integer"):
        reg.parse("gizmo", size=2.5)


# ------------------------------------------------------------------------------ canonical form, aliases
def test_canonical_str(reg: Registry) -> None:
    assert str(reg.parse("gizmo")) == "gizmo"
    assert str(reg.parse("gizmo:size=2,mode=slow")) == "gizmo"  # defaults are dropped
    # declared order, not the order written; floats keep their precision
    s = reg.parse("gizmo:mode=fast,loud=true,rate=1e-8,size=3")
    assert str(s) == "gizmo:size=3,rate=1e-08,loud=true,mode=fast"
    assert reg.parse(str(s)).options == s.options  # the canonical form round-trips
    assert reg.parse(s).options == s.options  # a Spec is accepted where a string is
    assert isinstance(s, Spec) and s.info.name == "gizmo"


def test_aliases(reg: Registry) -> None:
    s = reg.parse("gizmo-big")
    assert s.name == "gizmo" and s.options["size"] == 8 and s.options["mode"] == "fast"
    assert str(s) == "gizmo:size=8,mode=fast"
    assert reg.parse("gizmo-big:size=9").options["size"] == 9  # a preset can be overridden
    with pytest.raises(UsageError, match="given twice"):
        reg.parse("gizmo-big:size=9,size=10")
    assert "gizmo-big" in reg and reg.get("gizmo-big").name == "gizmo"
    assert reg.names() == ["gizmo", "plain"]  # aliases are not separate plugins


def test_create_passes_options(reg: Registry) -> None:
    obj = reg.create("gizmo-big:loud=1", tag="t")
    assert obj.tag == "t"
    assert obj.options_given == {"size": 8, "rate": 0.5, "loud": True, "mode": "fast", "cap": None}


# ------------------------------------------------------------------------------ errors that help
def test_unknown_name_suggests_and_lists(reg: Registry) -> None:
    with pytest.raises(UsageError) as info:
        reg.parse("gizmos:size=3")
    msg = str(info.value)
    assert "unknown widget 'gizmos'" in msg and "Did you mean 'gizmo'" in msg
    assert "Available: gizmo, gizmo-big, plain" in msg and "slim list widgets" in msg
    with pytest.raises(UsageError) as info:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(info.value) and "Available:" in str(info.value)


def test_unknown_key_suggests_and_lists(reg: Registry) -> None:
    with pytest.raises(UsageError) as info:
        reg.parse("gizmo:sise=3")
    msg = str(info.value)
    assert "unknown option 'sise'" in msg and "Did you mean 'size'" in msg
    assert "Valid options: size (an integer, default 2)" in msg and "mode (one of slow, fast" in msg
    with pytest.raises(UsageError, match="'plain' takes no options"):
        reg.parse("plain:x=1")


def test_real_registries_suggest_close_matches() -> None:
    with pytest.raises(UsageError, match="Did you mean 'scad'"):
        PENALTIES.parse("scda")
    with pytest.raises(UsageError, match="Did you mean 'vgg19'"):
        ARCHS.parse("vgg91")
    with pytest.raises(UsageError, match="slim list datasets"):
        DATASETS.parse("imagenet-21k-full")


def test_every_registered_spec_round_trips() -> None:
    """Built-ins and any plugin imported into this process."""
    for registry in REGISTRIES.values():
        assert registry.names(), registry.kind
        for info in registry:
            assert info.description, f"{info.name} needs a docstring (shown by slim list)"
            assert str(registry.parse(info.name)) == info.name
            explicit = ",".join(f"{o.name}={o.default}" for o in info.options)
            if explicit:  # spelling out the defaults gives the bare name back
                assert str(registry.parse(f"{info.name}:{explicit}")) == info.name
            for alias in info.aliases:
                spec = registry.parse(alias)
                assert registry.parse(str(spec)).options == spec.options


# ------------------------------------------------------------------------------ duplicates
def test_duplicate_names_raise(reg: Registry) -> None:
    with pytest.raises(PluginError) as info:
        reg.register("gizmo")(type("Other", (), {}))
    msg = str(info.value)
    assert "widget 'gizmo' is registered twice" in msg and "rename one" in msg
    assert f"module {__name__}" in msg  # says who registered it
    with pytest.raises(PluginError, match="'gizmo-big' is registered twice"):
        reg.register("gizmo-big")(type("Other", (), {}))  # a name that is taken by an alias
    with pytest.raises(PluginError, match="'plain' is registered twice"):
        reg.register("fresh", aliases={"plain": {}})(type("Other", (), {}))  # an alias that is a name
    assert "fresh" not in reg  # a failed registration leaves nothing behind


def test_unregister_removes_aliases(reg: Registry) -> None:
    reg.unregister("gizmo")
    assert "gizmo" not in reg and "gizmo-big" not in reg
    reg.register("gizmo-big")(type("Again", (), {}))  # the alias name is free again


def test_builtin_name_cannot_be_taken() -> None:
    PENALTIES.names()
    with pytest.raises(
        PluginError, match=r"penalty 'l1' is registered twice.*built-in slimcli\.penalties\.l1"
    ):
        PENALTIES.register("l1")(type("Fake", (), {}))


# ------------------------------------------------------------------------------ loading plugins
PLUGIN = textwrap.dedent(
    '''
    from slimcli.penalties import Penalty
    from slimcli.registry import Option, register_penalty


    @register_penalty("cubic-test", aliases={"cubic-strong": {"k": 3.0}})
    class Cubic(Penalty):
        """k·|x|³, a plugin written for the tests."""

        options = (Option("k", float, 1.0, "scale", check=lambda v: v > 0, rule="k > 0"),)

        def value(self, x):
            return self.k * x.abs().pow(3).sum()

        def subgradient(self, x):
            return 3 * self.k * x * x.abs()
    '''
)


def run_slim(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run(
        [sys.executable, "-m", "slimcli", *args], capture_output=True, text=True, env=full, timeout=120
    )


def names_in(stdout: str) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads(stdout)}


def test_slim_plugins_files_load_and_broken_ones_warn(tmp_path: Path) -> None:
    good = tmp_path / "cubic_plugin.py"
    good.write_text(PLUGIN)
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import this_module_does_not_exist_anywhere\n")
    clash = tmp_path / "clash_plugin.py"
    clash.write_text(
        "from slimcli.registry import register_penalty\n\n"
        "@register_penalty('l1')\nclass FakeL1:\n    '''steals a built-in name'''\n"
    )
    missing = tmp_path / "nowhere.py"
    plugins = os.pathsep.join(map(str, [good, broken, clash, missing]))
    res = run_slim(
        "list", "penalties", "--json", env={"SLIM_PLUGINS": plugins, "SLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    )
    assert res.returncode == 0, res.stderr
    listed = names_in(res.stdout)  # stdout stays pure JSON despite the warnings
    cubic = listed["cubic-test"]
    assert cubic["source"] == f"file {good}"
    assert cubic["aliases"] == {"cubic-strong": {"k": 3.0}}
    assert cubic["options"][0]["name"] == "k" and cubic["options"][0]["rule"] == "k > 0"
    assert listed["l1"]["source"] == "built-in slimcli.penalties.l1"  # the clash did not replace it
    assert "l1" in listed and "tl1" in listed
    for path, why in [
        (broken, "ModuleNotFoundError"),
        (clash, "registered twice"),
        (missing, "no such file"),
    ]:
        line = next((ln for ln in res.stderr.splitlines() if str(path) in ln), "")
        assert why in line and "failed to load and is skipped" in line, (path, res.stderr)
    assert "Traceback" not in res.stderr

    table = run_slim("list", env={"SLIM_PLUGINS": str(broken)})
    assert table.returncode == 0 and "tl1" in table.stdout
    assert "not loaded" in table.stdout and "broken_plugin.py" in table.stdout


def _fake_distribution(site: Path) -> None:
    """An installed-looking distribution with two slim.penalties entry points, one broken."""
    dist = site / "slim_fake_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: slim-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[slim.penalties]\nfakepen = slim_fake_plugin\nbrokenpen = slim_fake_broken\n"
    )
    (site / "slim_fake_plugin.py").write_text(
        PLUGIN.replace("cubic-test", "fakepen").replace("cubic-strong", "fp3")
    )
    (site / "slim_fake_broken.py").write_text("raise ImportError('needs libfoo, which is not installed')\n")


def test_entry_points_load_unless_disabled(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_distribution(site)
    on = run_slim(
        "list", "penalties", "--json", env={"PYTHONPATH": str(site), "SLIM_DISABLE_PLUGIN_AUTOLOAD": None}
    )
    assert on.returncode == 0, on.stderr
    listed = names_in(on.stdout)
    assert listed["fakepen"]["source"] == "'fakepen' (entry point slim_fake_plugin, slim.penalties)"
    assert "brokenpen" in on.stderr and "needs libfoo" in on.stderr and "Traceback" not in on.stderr

    off = run_slim(
        "list", "penalties", "--json", env={"PYTHONPATH": str(site), "SLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    )
    assert off.returncode == 0, off.stderr
    assert "fakepen" not in names_in(off.stdout) and "brokenpen" not in off.stderr


# ------------------------------------------------------------------------------ one loader
def test_builtin_plugins_list_every_plugin_module() -> None:
    """BUILTIN_PLUGINS names each built-in module exactly once (a new file cannot be forgotten)."""
    import pkgutil

    import slimcli.archs
    import slimcli.data
    import slimcli.penalties
    from slimcli.registry import BUILTIN_PLUGINS

    found = {
        f"{pkg.__name__}.{m.name}"
        for pkg in (slimcli.penalties, slimcli.archs, slimcli.data)
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_")
    }
    assert sorted(BUILTIN_PLUGINS) == sorted(found)
    assert len(set(BUILTIN_PLUGINS)) == len(BUILTIN_PLUGINS)
    sources = {info.source for registry in REGISTRIES.values() for info in registry}
    assert {f"built-in {m}" for m in BUILTIN_PLUGINS} <= sources


def test_a_plugin_that_fails_half_way_registers_nothing(tmp_path: Path) -> None:
    """Registered a penalty and an arch, then raised: both registrations are rolled back."""
    from slimcli.registry import FAILED, load_plugin_file

    path = tmp_path / "half_plugin.py"
    path.write_text(textwrap.dedent("""
        from slimcli.registry import register_arch, register_penalty

        @register_penalty("half-test-pen")
        class HalfPen:
            '''registered before the failure'''

        @register_arch("half-test-arch")
        class HalfArch:
            '''registered before the failure'''

        raise RuntimeError("broken after registering two plugins")
    """))
    before = {name: set(registry.names()) for name, registry in REGISTRIES.items()}
    failed_before = len(FAILED)
    with pytest.warns(UserWarning, match="half_plugin.py failed to load"):
        assert load_plugin_file(path) is False
    assert {name: set(registry.names()) for name, registry in REGISTRIES.items()} == before
    assert "half-test-pen" not in PENALTIES and "half-test-arch" not in ARCHS
    assert FAILED[failed_before:] == [(f"file {path}", "RuntimeError: broken after registering two plugins")]
    del FAILED[failed_before:]
    # fixed, the same file loads (nothing of the failed attempt is left to clash with)
    path.write_text(path.read_text().replace('raise RuntimeError("broken after registering two plugins")',
                                             ""))
    try:
        assert load_plugin_file(path) is True
        assert "half-test-pen" in PENALTIES and "half-test-arch" in ARCHS
        assert PENALTIES.get("half-test-pen").source == f"file {path}"
    finally:
        PENALTIES.unregister("half-test-pen")
        ARCHS.unregister("half-test-arch")


def test_a_failing_builtin_is_a_warning_through_the_same_loader() -> None:
    """Built-ins go through load_plugin like any plugin: a broken one is skipped with a warning."""
    code = textwrap.dedent("""
        import warnings, json
        import slimcli.registry as r
        r.BUILTIN_PLUGINS = (*r.BUILTIN_PLUGINS, "slimcli.penalties._no_such_builtin")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            names = r.PENALTIES.names()
        print(json.dumps({"names": names, "warnings": [str(x.message) for x in w], "failed": r.FAILED}))
    """)
    env = {**os.environ, "SLIM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    doc = json.loads(res.stdout)
    assert "l1" in doc["names"] and "tl1" in doc["names"]
    assert any("built-in slimcli.penalties._no_such_builtin failed to load" in m for m in doc["warnings"])
    assert doc["failed"][0][0] == "built-in slimcli.penalties._no_such_builtin"
