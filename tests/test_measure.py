"""params / MACs / FLOPs: FlopCounterMode-based counts against closed forms and the paper."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimcli.archs import create_arch
from slimcli.archs.vgg import CFGS
from slimcli.errors import UsageError
from slimcli.measure import count_params, human, measure


def conv_macs(c_in: int, c_out: int, k: int, h_out: int, w_out: int, groups: int = 1) -> int:
    return c_out * (c_in // groups) * k * k * h_out * w_out


def test_small_model_matches_closed_form() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 28×28
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False),  # 14×14, grouped
        nn.Flatten(),
        nn.Linear(8 * 14 * 14, 5),
    )
    m = measure(model, (1, 28, 28))
    want = [conv_macs(1, 4, 3, 28, 28), conv_macs(4, 8, 3, 14, 14, groups=2), 8 * 14 * 14 * 5]
    assert [row.macs for row in m.per_layer] == want
    assert [row.name for row in m.per_layer] == ["0", "3", "5"]
    assert [row.type for row in m.per_layer] == ["Conv2d", "Conv2d", "Linear"]
    assert [row.params for row in m.per_layer] == [4 * 9 + 4, 8 * 2 * 9, 8 * 14 * 14 * 5 + 5]
    assert m.macs == sum(want) and m.flops == 2 * sum(want)
    assert m.params == count_params(model) == sum(p.numel() for p in model.parameters())


def test_vgg19_macs_closed_form_and_paper() -> None:
    model = create_arch("vgg19")
    m = measure(model, (3, 32, 32))
    want, c_in, size = 0, 3, 32
    for c in CFGS[19]:
        if c == "M":
            size //= 2
        else:
            want += conv_macs(c_in, int(c), 3, size, size)
            c_in = int(c)
    want += 512 * 10
    assert m.macs == want
    assert m.macs == pytest.approx(3.98e8, rel=0.005)
    assert m.flops == pytest.approx(7.97e8, rel=0.005)  # the paper's FLOPs
    assert m.params == 20_035_018
    assert sum(row.macs for row in m.per_layer) == m.macs
    assert len(m.per_layer) == 17  # 16 convs + the classifier
    bns = [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    bn_params = sum(p.numel() for bn in bns for p in bn.parameters())
    assert sum(row.params for row in m.per_layer) + bn_params == m.params


def test_resnet164_macs_and_per_layer_rows() -> None:
    model = create_arch("resnet164")
    m = measure(model)  # the model records its input_shape
    assert m.macs == pytest.approx(2.48e8, rel=0.005)
    assert m.params == 1_703_258
    rows = {row.name: row for row in m.per_layer}
    assert rows["stage1.0.conv1"].macs == conv_macs(16, 16, 1, 32, 32)
    assert rows["stage2.0.shortcut"].macs == conv_macs(64, 128, 1, 16, 16)
    assert rows["fc"].macs == 256 * 10 and rows["fc"].type == "Linear"
    assert sum(row.macs for row in m.per_layer) == m.macs


def test_graph_module_gives_the_same_rows() -> None:
    model = create_arch("resnet56:depth=14")
    traced = torch.fx.symbolic_trace(model)
    assert measure(traced, (3, 32, 32)) == measure(model, (3, 32, 32))


def test_leaves_model_untouched() -> None:
    model = create_arch("densenet40:depth=7,growth=4,stem=8").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure(model)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert all(p.grad is None for p in model.parameters())


def test_input_shape_changes_macs_not_params() -> None:
    model = create_arch("resnet56:depth=8", input_shape=(1, 28, 28))
    m = measure(model)
    assert m.input_shape == (1, 28, 28)
    assert {row.name: row.macs for row in m.per_layer}["stem"] == conv_macs(1, 16, 3, 28, 28)
    with pytest.raises(UsageError, match="cannot run"):
        measure(model, (3, 32, 32))


def test_needs_an_input_shape() -> None:
    with pytest.raises(UsageError, match="input_shape"):
        measure(nn.Sequential(nn.Linear(3, 2)))
    assert measure(nn.Sequential(nn.Linear(3, 2)), (3,)).macs == 6


def test_as_dict_is_json() -> None:
    d = json.loads(json.dumps(measure(create_arch("vgg11:width=0.125")).as_dict()))
    assert d["flops"] == 2 * d["macs"] and d["input_shape"] == [3, 32, 32]
    assert all(row["flops"] == 2 * row["macs"] for row in d["per_layer"])
    assert d["per_layer"][0]["name"] == "features.0"


def test_count_params_counts_shared_once() -> None:
    lin = nn.Linear(4, 4)
    assert count_params(nn.Sequential(lin, lin)) == 20


def test_human() -> None:
    assert human(20_035_018) == "20.04M"
    assert human(398_136_320) == "398.1M"
    assert human(1_703_258) == "1.703M"
    assert human(512) == "512"


def test_sessions_timed_together_stop_spinning_after_a_run() -> None:
    """Interleaved timing needs each session's workers idle between its runs (benchmarks/ort_spinning.py);
    the parity checks, the timed choice, ``--check-runtimes`` and the demo get their sessions here; a
    file timed alone keeps onnxruntime's default."""
    ort = pytest.importorskip("onnxruntime")
    from slimcli.export import verify
    from slimcli.measure import ort_options

    opts = ort_options(ort, 2)
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    assert opts.intra_op_num_threads == 2
    assert ort_options(ort).intra_op_num_threads == ort.SessionOptions().intra_op_num_threads
    with pytest.raises(RuntimeError, match="does not have configuration"):  # timed alone: as deployed
        ort_options(ort, stop_spinning=False).get_session_config_entry("session.force_spinning_stop")
    seen = []

    class Spy:
        SessionOptions = ort.SessionOptions

        @staticmethod
        def InferenceSession(model: bytes, sess_options: object, providers: list[str]) -> object:
            seen.append(sess_options)
            return object()

    verify.session_for(Spy, b"", threads=1)
    assert seen[0].get_session_config_entry("session.force_spinning_stop") == "1"
