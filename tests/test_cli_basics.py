"""The command-line contract: version, slim list, pure JSON on stdout, exit codes 0/1/2, SLIM_DEBUG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slimcli
from slimcli.cli import main
from slimcli.errors import CheckpointError, SlimError, UsageError
from slimcli.registry import REGISTRIES


def run(*args: str, slim_debug: str | None = None, script: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SLIM_DEBUG", None)
    if slim_debug is not None:
        env["SLIM_DEBUG"] = slim_debug
    exe = [str(Path(sys.executable).with_name("slim"))] if script else [sys.executable, "-m", "slimcli"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, env=env, timeout=120)


# ------------------------------------------------------------ subprocess: the real entry points
def test_version_via_module() -> None:
    res = run("--version")
    assert res.returncode == 0 and res.stdout == f"slim {slimcli.__version__}\n" and res.stderr == ""


#: run main(argv) in a fresh interpreter, then print which heavy libraries it imported
_IMPORT_PROBE = """
import json, sys
from slimcli.cli import main
try:
    main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = exc.code
else:
    code = None
heavy = ("torch", "torchvision", "numpy", "safetensors", "onnx", "onnxruntime", "matplotlib")
print(json.dumps({"code": code, "typer": "typer" in sys.modules,
                  "heavy": sorted(m for m in heavy if m in sys.modules)}), file=sys.__stderr__)
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], [], *([cmd, "--help"] for cmd in (
    "sparsify-train", "finetune", "prune", "sweep", "inspect", "export", "import", "demo", "list"))],
                         ids=lambda a: " ".join(a) or "no-args")
def test_version_and_help_do_not_import_torch(args: list[str]) -> None:
    """Start-up stays fast (docs/benchmarks.md): --version/--help never import torch or numpy."""
    env = {k: v for k, v in os.environ.items() if k not in ("SLIM_DEBUG", "SLIM_PLUGINS")}
    res = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, json.dumps(args)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    probe = json.loads(res.stderr.strip().splitlines()[-1])
    assert probe["typer"] and probe["code"] in (0, 2, None), probe  # no-args shows help (exit 2 in click 8.2)
    assert probe["heavy"] == [], f"slim {' '.join(args)} imported {probe['heavy']}"


def test_console_script_list_json_is_pure_json_on_stdout() -> None:
    script = Path(sys.executable).with_name("slim")
    assert script.exists(), "the package must be installed (pip install -e .) so the slim script exists"
    res = run("list", "penalties", "--json", script=True)
    assert res.returncode == 0 and res.stderr == ""
    data = json.loads(res.stdout)  # the whole of stdout, nothing before or after
    # plugins imported into this process (the example plugin's tests) are not autoloaded there
    builtins = [i.name for i in REGISTRIES["penalties"] if i.source.startswith("built-in ")]
    assert [p["name"] for p in data] == builtins
    assert {"name", "description", "options", "aliases", "source"} <= set(data[0])


def test_unknown_kind_exits_2() -> None:
    res = run("list", "nonsense")
    assert res.returncode == 2 and res.stdout == ""
    assert "Error" in res.stderr and "penalties, archs or datasets" in res.stderr
    assert "Traceback" not in res.stderr


def test_runtime_error_is_one_line_exit_1_and_debug_shows_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"this is not a checkpoint at all")
    res = run("export", str(bad), str(tmp_path / "m.onnx"))
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"Error: {bad} is not a safetensors file; pass a checkpoint written by slim"
    ]
    assert not (tmp_path / "m.onnx").exists()

    dbg = run("export", str(bad), str(tmp_path / "m.onnx"), slim_debug="1")
    assert dbg.returncode == 1
    assert "Traceback (most recent call last)" in dbg.stderr
    assert "slimcli.errors.CheckpointError" in dbg.stderr


# ------------------------------------------------------------ in process: main()'s error handling
@pytest.fixture
def failing_list(monkeypatch: pytest.MonkeyPatch):
    """Make `slim list` raise the given error from inside the command."""

    def arm(exc: Exception) -> None:
        def boom() -> None:
            raise exc

        monkeypatch.setattr("slimcli.cli.list.load_plugins", boom)

    monkeypatch.delenv("SLIM_DEBUG", raising=False)
    return arm


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (SlimError("the registry is on fire; call the fire brigade"), 1),
        (CheckpointError("ckpt is truncated; re-copy it"), 1),
        (UsageError("unknown penalty 'x'; see slim list"), 2),
    ],
)
def test_main_turns_slim_errors_into_one_line(
    failing_list, capsys: pytest.CaptureFixture[str], exc: SlimError, code: int
) -> None:
    failing_list(exc)
    with pytest.raises(SystemExit) as info:
        main(["list"])
    assert info.value.code == code
    captured = capsys.readouterr()
    assert captured.err == f"Error: {exc}\n" and captured.out == ""


@pytest.mark.parametrize(("value", "raises"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_slim_debug_reraises(
    failing_list,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    raises: bool,
) -> None:
    failing_list(SlimError("boom; do something"))
    monkeypatch.setenv("SLIM_DEBUG", value)
    if raises:
        with pytest.raises(SlimError, match="boom"):
            main(["list"])
    else:
        with pytest.raises(SystemExit) as info:
            main(["list"])
        assert info.value.code == 1 and capsys.readouterr().err == "Error: boom; do something\n"


def test_other_exceptions_are_not_swallowed(failing_list) -> None:
    failing_list(ZeroDivisionError("a bug, not a user error"))
    with pytest.raises(ZeroDivisionError):  # a real bug keeps its traceback
        main(["list"])


def test_main_success_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["list", "datasets", "--json"])
    assert info.value.code == 0
    assert [d["name"] for d in json.loads(capsys.readouterr().out)] == REGISTRIES["datasets"].names()


def test_list_table_shows_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["list"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for kind, registry in REGISTRIES.items():
        assert kind in out
        for name in registry.names():
            assert name in out, name


def test_list_json_all_kinds_and_singular(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["list", "--json"])
    everything = json.loads(capsys.readouterr().out)
    assert set(everything) == {"penalties", "archs", "datasets"}
    with pytest.raises(SystemExit):
        main(["list", "arch", "--json"])
    assert json.loads(capsys.readouterr().out) == everything["archs"]


@pytest.mark.parametrize("args", [["no-such-command"], ["list", "--no-such-option"], ["list", "datset"]])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Error" in captured.err and "Traceback" not in captured.err
    if args == ["list", "datset"]:
        assert "Did you mean 'datasets'?" in captured.err


def _bad_checkpoint(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A path a user might wrongly pass as CKPT, and what its error must say."""
    if kind == "folder":
        (tmp_path / "run").mkdir()
        return tmp_path / "run", "is a folder, not a checkpoint; pass a .safetensors file"
    if kind == "pth":
        import torch

        torch.save({"w": torch.zeros(2)}, tmp_path / "model.pth")
        return tmp_path / "model.pth", "slim never unpickles files"
    if kind == "random":
        (tmp_path / "x.safetensors").write_bytes(os.urandom(4096))
        return tmp_path / "x.safetensors", "is not a safetensors file"
    import torch
    from safetensors.torch import save_file

    save_file({"step": torch.zeros(1)}, str(tmp_path / "last.state.safetensors"),
              metadata={"slim.format": "1"})
    return tmp_path / "last.state.safetensors", f"not a model; pass {tmp_path / 'last.safetensors'}"


@pytest.mark.parametrize("kind", ["folder", "pth", "random", "state"])
@pytest.mark.parametrize("command", ["inspect", "prune", "export"])
def test_bad_checkpoints_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                            command: str, kind: str) -> None:
    path, needle = _bad_checkpoint(tmp_path, kind)
    extra = {"inspect": [], "prune": ["--ratio", "0.5"], "export": [str(tmp_path / "m.onnx")]}[command]
    with pytest.raises(SystemExit) as info:
        main([command, str(path), *extra])
    captured = capsys.readouterr()
    assert info.value.code == 1 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("Error: ") and needle in lines[-1], captured.err
    assert not any(line.startswith("Error") for line in lines[:-1]) and "Traceback" not in captured.err


def test_help_lists_every_command_without_truncation(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    commands = out.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in commands] == [
        "demo", "export", "finetune", "import", "inspect", "list", "prune", "sparsify-train", "sweep"]
    assert all(line.rstrip().endswith(".") and not line.rstrip().endswith("...") for line in commands), out


def test_list_table_explains_each_option(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcli.cli._common import out

    monkeypatch.setattr(out, "_width", 400)  # no wrapping: each help text on one line
    with pytest.raises(SystemExit) as info:
        main(["list"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    helps = [o["help"] for registry in REGISTRIES.values() for p in registry for o in p.as_dict()["options"]]
    assert helps and all(h in text for h in helps if h)
    assert "none = lam, which reproduces the reference code" in text  # why scad/mcp act on |γ| ≤ a·λ only


def test_plugin_warning_is_one_plain_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('needs libfoo')\n")
    env = {**os.environ, "SLIM_PLUGINS": str(broken)}
    env.pop("SLIM_DEBUG", None)
    cmd = [sys.executable, "-m", "slimcli", "list", "penalties", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and json.loads(res.stdout)  # stdout stays pure JSON
    assert res.stderr.splitlines() == [
        f"warning: plugin file {broken} failed to load and is skipped (RuntimeError: needs libfoo)"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**env, "SLIM_DEBUG": "1"}, timeout=120)
    assert "UserWarning: slim: plugin file" in res.stderr  # SLIM_DEBUG: Python's form, with file and line
