"""User architectures: ``--arch FILE.py:OBJECT[:k=v,…]`` through sparsify-train → prune → export,
the constructor convention, the recorded spec (absolute path + sha256), the one-line errors, the
Python API, and the registry's positional option (``timm:NAME``)."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import typer
from _helpers import run_cli
from torch import nn

from slimcli.archs import arch_spec, create_arch
from slimcli.checkpoint import load_checkpoint, save_checkpoint
from slimcli.errors import CheckpointError, PluginError, UsageError
from slimcli.measure import measure
from slimcli.model import build_model
from slimcli.registry import ARCHS, PENALTIES, Option, file_spec_parts

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = "synthetic:n=64,n_test=32,size=8,classes=4"

#: A user's network: a plain conv-BN-ReLU chain, a post-activation residual block, a depthwise
#: conv and squeeze-excite (what people bring); only standard torch.
NET = '''
"""A user's own network."""
import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(1, c // 2), 1), nn.Conv2d(max(1, c // 2), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class Net(nn.Module):
    """Conv chain, residual block, depthwise conv and SE."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 8, se: bool = True):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                  nn.ReLU(), nn.Conv2d(2 * w, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.dw, self.bn3 = nn.Conv2d(w, w, 3, padding=1, groups=w, bias=False), nn.BatchNorm2d(w)
        self.se = SE(w) if se else nn.Identity()
        self.fc = nn.Linear(w, num_classes)

    def forward(self, x):
        x = self.body(self.stem(x))
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)
        x = self.se(torch.relu(self.bn3(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def small(num_classes, input_shape, scale=0.5):
    """A factory: gets num_classes and input_shape because it names them."""
    return Net(num_classes, input_shape[0], width=max(1, int(16 * scale)))


def not_a_model():
    return 3
'''


def _write(path: Path, text: str = NET) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error:")]


# ----------------------------------------------------------------------------------------------
# the whole flow on the command line


def test_user_file_trains_prunes_and_exports_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    net = _write(tmp_path / "models" / "mynet.py")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code, _, err = run_cli(["sparsify-train", "--arch", "models/mynet.py:Net:width=6,se=true", "--dataset",
                            DATA, "--epochs", "1", "--batch-size", "32", "--lam", "1e-3", "--out", str(run)],
                           capsys)
    assert code == 0, err
    ckpt = load_checkpoint(run / "best.safetensors")
    # the recorded spec: absolute path, the options, the file's sha256 — enough to rebuild
    assert ckpt.meta["arch"] == f"{net.resolve()}:Net:width=6,sha256={_sha(net)}"
    dense = build_model(ckpt)
    assert type(dense).__name__ == "Net" and dense.fc.out_features == 4 and dense.stem[0].in_channels == 3

    onnx_path = tmp_path / "slim.onnx"
    code, stdout, err = run_cli(["prune", str(run / "best.safetensors"), "--ratio", "0.3", "--recalibrate",
                                 "0", "--json", "--export", str(onnx_path)], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    pruned = load_checkpoint(Path(res["out"]))
    assert pruned.meta["arch"] == ckpt.meta["arch"]
    slim = build_model(pruned)  # rebuilt from the user file + recorded widths, strict load
    before, after = measure(dense, (3, 8, 8)).params, measure(slim, (3, 8, 8)).params
    assert pruned.meta["prune"]["params_before"] == before
    assert pruned.meta["prune"]["params_after"] == after < before
    assert any(pruned.widths[n] < dense.get_submodule(n).num_features for n in pruned.widths)

    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, slim(x).numpy(), rtol=1e-4, atol=1e-5)

    # the file changes afterwards: a weight-compatible edit warns and still rebuilds ...
    net.write_text(net.read_text() + "\n# an edit 12345678\n")
    with pytest.warns(UserWarning, match=r"changed since this spec was recorded .*built from the file as it"):
        build_model(pruned)
    # ... an edit that changes the layers warns and then fails to load, saying why (same size
    # and the same second as the last edit: the code run is the code hashed, no stale bytecode)
    fc = "self.fc = nn.Linear(w, num_classes)"
    edited = net.read_text().replace(fc, fc[:-1] + ", bias=0)").replace("edit 12345678", "edit ")
    assert len(edited) == len(net.read_text())
    net.write_text(edited)
    with pytest.warns(UserWarning, match="changed since"), pytest.raises(CheckpointError, match=r"fc\.bias"):
        build_model(pruned)
    # ... and a file that is gone is one line naming it
    net.unlink()
    with pytest.raises(CheckpointError, match=r"mynet\.py does not exist; .*absolute path"):
        build_model(pruned)


def test_default_run_folder_is_named_after_the_spec_as_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    _write(tmp_path / "net.py")
    monkeypatch.chdir(tmp_path)
    from slimcli.cli._train_options import _arch

    assert _arch(" vgg11:width=1.0 ") == str(ARCHS.parse("vgg11")) == "vgg:depth=11"  # canonical
    assert _arch(" models/../net.py:Net:width=4 ") == "models/../net.py:Net:width=4"  # as typed
    with pytest.raises(typer.BadParameter, match="does not exist"):
        _arch("nowhere/net.py:Net")


def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = _write(tmp_path / "net.py")
    (tmp_path / "broken.py").write_text("import torch\nimport not_a_module_anyone_has_xyz\n")
    (tmp_path / "syntax.py").write_text("def f(:\n")
    base = ["sparsify-train", "--dataset", DATA, "--epochs", "1", "--out", str(tmp_path / "r"), "--arch"]
    cases = [  # (arch, exit code, what the message says)
        (f"{tmp_path}/missing.py:Net", 2, "missing.py does not exist"),
        (str(net), 2, "name the class or function .* defines: SE, Net, small, not_a_model"),
        (f"{net}:Nett", 2, "has no 'Nett' .*defines: SE, Net"),
        (f"{net}:Net:widht=4", 2, "unknown option 'widht'. Did you mean 'width'"),
        (f"{net}:Net:width=wide", 2, "option 'width' must be an integer, got 'wide'"),
        (f"{net}:torch", 2, "torch is a module, not a class or function"),
        (f"{net}:not_a_model", 1, "not_a_model returned int, not a torch.nn.Module"),
        (f"{tmp_path}/broken.py:Net", 1, r"broken.py failed to import: ModuleNotFoundError: .*broken.py:2\)"),
        (f"{tmp_path}/syntax.py:f", 1, r"syntax.py failed to import: SyntaxError: .*syntax.py:1\)"),
    ]
    for arch, want_code, message in cases:
        code, _, err = run_cli([*base, arch], capsys)
        assert code == want_code and len(_errors(err)) == 1 and "Traceback" not in err, (arch, err)
        assert re.search(message, _errors(err)[0]), (arch, err)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------
# the constructor convention and the spec


def test_signature_decides_what_is_passed_and_how_options_convert(tmp_path: Path) -> None:
    f = _write(tmp_path / "conv.py", '''
        from torch import nn

        class Probe(nn.Module):
            def __init__(self, input_shape, width: int = 2, rate: float = 0.5, flag=False, name="a",
                         anything=None, tag: "str | None" = None):
                super().__init__()
                self.seen = dict(input_shape=input_shape, width=width, rate=rate, flag=flag, name=name,
                                 anything=anything, tag=tag)
                self.fc = nn.Linear(2, 2)

        def needs(num_classes, depth):
            m = nn.Linear(2, num_classes)
            m.depth = depth
            return m
    ''')
    spec = ARCHS.parse(f"{f}:Probe:width=3.0,rate=1,flag=yes,anything=0.25,tag=none")
    assert spec.options == {"width": 3, "rate": 1.0, "flag": True, "name": "a", "anything": 0.25, "tag": None,
                            "sha256": _sha(f)}
    assert str(spec) == f"{f}:Probe:width=3,rate=1.0,flag=true,anything=0.25,sha256={_sha(f)}"
    assert ARCHS.parse(str(spec)).options == spec.options  # the canonical form round-trips
    seen = create_arch(spec, 5, (2, 6, 6)).seen
    assert seen == {"input_shape": (2, 6, 6), "width": 3, "rate": 1.0, "flag": True, "name": "a",
                    "anything": 0.25, "tag": None}  # no num_classes: Probe does not take it
    for text, value in [("7", 7), ("-2.5", -2.5), ("false", False), ("none", None), ("big", "big")]:
        assert create_arch(f"{f}:Probe:anything={text}", 3, (1, 4, 4)).seen["anything"] == value
    assert create_arch(f"{f}:needs:depth=4", 6, (1, 4, 4)).depth == 4  # the literal rule: int
    with pytest.raises(UsageError, match="needs 'depth' \\(no default\\)"):
        create_arch(f"{f}:needs")


def test_a_recorded_sha256_that_differs_warns(tmp_path: Path) -> None:
    f = _write(tmp_path / "net.py")
    other = "0" * 64
    with pytest.warns(UserWarning, match=f"sha256 {other[:12]}… then, {_sha(f)[:12]}… now"):
        spec = ARCHS.parse(f"{f}:Net:sha256={other}")
    assert spec.options["sha256"] == other  # what was recorded stays on record
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ARCHS.parse(f"{f}:Net:sha256={_sha(f)}")
    with pytest.raises(UsageError, match="64 lowercase hex digits"):
        ARCHS.parse(f"{f}:Net:sha256=abc")


def test_file_spec_parts() -> None:
    assert file_spec_parts("a/b/net.py:Net:w=1,x=2") == ("a/b/net.py", "Net", "w=1,x=2")
    assert file_spec_parts(r"C:\models\net.py:Net") == (r"C:\models\net.py", "Net", "")
    assert file_spec_parts("net.py") == ("net.py", "", "")
    assert file_spec_parts("my.pyramid:x") is None and file_spec_parts("vgg19:width=0.5") is None
    with pytest.raises(UsageError, match="cannot be read from a Python file spec"):
        PENALTIES.parse("pen.py:Cubic")


# ----------------------------------------------------------------------------------------------
# the Python API


def test_create_arch_takes_a_class_or_factory(tmp_path: Path) -> None:
    class Local(nn.Module):
        def __init__(self, num_classes: int, input_shape: tuple, width: int = 4) -> None:
            super().__init__()
            self.conv = nn.Conv2d(input_shape[0], width, 3, bias=False)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    m = create_arch(Local, 3, (2, 8, 8), width="5")
    assert m.conv.in_channels == 2 and m.conv.out_channels == 5 and m(torch.zeros(1, 2, 8, 8)).shape == (1, 3)
    assert create_arch(lambda num_classes: nn.Linear(4, num_classes), 7).out_features == 7
    with pytest.raises(UsageError, match="unknown option 'depth'"):
        create_arch(Local, depth=3)
    with pytest.raises(UsageError, match=r"not a torch\.nn\.Module subclass"):
        create_arch(dict)
    with pytest.raises(PluginError, match="returned str"):
        create_arch(lambda: "x")
    with pytest.raises(UsageError, match=r"not defined at the top level of a \.py file"):
        arch_spec(Local)

    f = _write(tmp_path / "net.py")
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_net_for_test", f)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    text = arch_spec(module.small, scale=0.25)
    assert text == f"{f.resolve()}:small:scale=0.25,sha256={_sha(f)}"
    assert create_arch(text, 4, (1, 8, 8)).stem[0].out_channels == 4


def test_a_user_model_from_python_saves_and_rebuilds(tmp_path: Path) -> None:
    f = _write(tmp_path / "net.py")
    spec = str(ARCHS.parse(f"{f}:small"))
    torch.manual_seed(0)
    model = create_arch(spec, 4, (3, 8, 8)).eval()
    meta = {"arch": spec, "num_classes": 4, "input_shape": [3, 8, 8]}
    save_checkpoint(tmp_path / "m.safetensors", model, meta)
    again = build_model(load_checkpoint(tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# the registry's positional option (used by the zoo plugin: timm:NAME)


def test_positional_option_spec_form() -> None:
    @ARCHS.register("zz-positional-test")
    class Zoo(nn.Module):
        """A zoo-like arch taking a model name."""

        positional = "model"
        options = (Option("model", str, None, "model name"), Option("drop", float, 0.0, "drop rate"))

        @classmethod
        def check_options(cls, values: dict) -> str | None:
            return None if values["model"] else "name a model: zz-positional-test:NAME"

    try:
        for text in ["zz-positional-test:m1", "zz-positional-test:model=m1", " zz-positional-test : m1 "]:
            spec = ARCHS.parse(text)
            assert spec.options == {"model": "m1", "drop": 0.0} and str(spec) == "zz-positional-test:m1"
        spec = ARCHS.parse("zz-positional-test:m1:drop=0.2")
        assert spec.options == {"model": "m1", "drop": 0.2} and str(spec) == "zz-positional-test:m1:drop=0.2"
        assert ARCHS.parse(str(spec)) == spec
        assert ARCHS.parse("zz-positional-test:drop=0.1,model=m2").options["model"] == "m2"
        with pytest.raises(UsageError, match="'model' is given twice"):
            ARCHS.parse("zz-positional-test:m1:model=m2")
        with pytest.raises(UsageError, match="name a model"):
            ARCHS.parse("zz-positional-test")
        with pytest.raises(UsageError, match="unknown option 'dorp'"):
            ARCHS.parse("zz-positional-test:m1:dorp=1")
    finally:
        ARCHS.unregister("zz-positional-test")
    # a plugin without a positional option reads NAME:x as before (an error: no key=value)
    with pytest.raises(UsageError, match="cannot read option 'x'"):
        ARCHS.parse("vgg:x")
