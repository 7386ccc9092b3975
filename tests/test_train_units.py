"""Building blocks of the training engine: augmentation, normalisation, device/amp choice,
config checks, the backward/penalty/step ordering and the resumable state."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcli.errors import TrainingError, UsageError
from slimcli.model import Normalizer
from slimcli.penalties import create_penalty
from slimcli.train import TrainConfig, optimizer_step
from slimcli.train.augment import random_crop_flip
from slimcli.train.config import parse_milestones
from slimcli.train.device import check_device_string, resolve_amp, resolve_device
from slimcli.train.state import LoopState, pack_state, unpack_state


# ---------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pad", "hflip"), [(2, True), (2, False), (0, True), (3, True)])
def test_crop_flip_equals_per_image_reference(pad: int, hflip: bool) -> None:
    x = torch.randint(0, 256, (16, 2, 5, 7), dtype=torch.uint8)
    out = random_crop_flip(x, pad, hflip, torch.Generator().manual_seed(3))
    # the same draws, applied one image at a time the torchvision way
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 2 * pad + 1, (16,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (16,), generator=g)
    flip = torch.randint(0, 2, (16,), generator=g, dtype=torch.bool)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i in range(16):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        crop = padded[:, oy[i] : oy[i] + 5, ox[i] : ox[i] + 7]
        if hflip and flip[i]:
            crop = crop.flip(-1)
        assert torch.equal(out[i], crop), i
    if pad or hflip:
        assert not torch.equal(out, x)  # 16 images: some crop or flip is not the identity


def test_crop_flip_consumes_the_same_random_stream_whatever_the_options() -> None:
    x = torch.zeros(4, 1, 6, 6, dtype=torch.uint8)
    states = []
    for pad, hflip in [(0, False), (2, True)]:
        g = torch.Generator().manual_seed(0)
        random_crop_flip(x, pad, hflip, g)
        states.append(g.get_state())
    assert torch.equal(states[0], states[1])


def test_normalizer_matches_formula_and_layout() -> None:
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = Normalizer(mean, std, torch.device("cpu"))(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    cl = Normalizer(mean, std, torch.device("cpu"), channels_last=True)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# device, precision, config
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cpu0", "", "cuda:-1"])
def test_bad_device_strings_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="--device must be"):
        check_device_string(text)


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(TrainingError, match="no CUDA device"):
            resolve_device("cuda:1")


def test_amp_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu).dtype is None  # CPU autocast is slower than fp32
    assert resolve_amp("off", cpu).dtype is None
    assert resolve_amp("bf16", cpu).dtype == torch.bfloat16 and not resolve_amp("bf16", cpu).scaler
    fp16 = resolve_amp("fp16", cpu)
    assert fp16.dtype == torch.float16 and fp16.scaler


def test_config_milestones_and_validation() -> None:
    assert TrainConfig(epochs=160).milestone_epochs() == [80, 120]  # the paper's epochs
    assert TrainConfig(epochs=2).milestone_epochs() == [1, 2]
    assert parse_milestones("0.3, 0.6") == (0.3, 0.6) and parse_milestones("") == ()
    for bad, match in [({"epochs": -1}, "--epochs"), ({"batch_size": 0}, "--batch-size"),
                       ({"lr": 0.0}, "--lr"), ({"lam": -1.0}, "--lam"),
                       ({"milestones": (1.5,)}, "milestones"),
                       ({"update": "adam"}, "--update"), ({"amp": "fp8"}, "--amp"),
                       ({"momentum": 0.0}, "nesterov"), ({"lr": float("nan")}, "--lr")]:
        with pytest.raises(UsageError, match=match):
            TrainConfig(**bad).validate()  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="milestones"):
        parse_milestones("half")
    out = TrainConfig(penalty="tl1:a=0.5").default_out("vgg:depth=11,width=0.25", "fashion-mnist",
                                                        dt.datetime(2024, 5, 6, 7, 8, 9))
    assert str(out) == "runs/vgg_depth=11_width=0.25-fashion-mnist-tl1_a=0.5-20240506-070809"
    assert TrainConfig.from_json(TrainConfig(milestones=(0.25,)).to_json()) == TrainConfig(milestones=(0.25,))


# ---------------------------------------------------------------------------------------
# backward → penalty → step ordering
# ---------------------------------------------------------------------------------------
def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, 0.5, 1.0]))
    return model


def _loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return model[1].weight.grad.clone()


@pytest.mark.parametrize("scaled", [False, True])
def test_subgradient_sees_unscaled_gradients(scaled: bool) -> None:
    """γ ← γ − lr·(∂loss/∂γ + λ·sign γ), whatever the loss scale: the penalty is added after
    GradScaler.unscale_ (done for real on the CPU here, with a 2^12 scale)."""
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)
    ref = _tiny()
    gamma0 = ref[1].weight.detach().clone()
    grad = _loss_grad(ref, x, y)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
    lam = 0.5
    optimizer_step(F.cross_entropy(model(x), y), opt, scaler, create_penalty("l1", lam), [model[1].weight],
                   "subgradient")
    expected = gamma0 - 0.1 * (grad + lam * torch.sign(gamma0))
    torch.testing.assert_close(model[1].weight.detach(), expected, atol=1e-6, rtol=1e-5)


def test_proximal_step_applies_prox_after_the_step() -> None:
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)
    ref = _tiny()
    gamma0 = ref[1].weight.detach().clone()
    grad = _loss_grad(ref, x, y)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    lam = 3.0
    optimizer_step(F.cross_entropy(model(x), y), opt, scaler, create_penalty("l1", lam), [model[1].weight],
                   "proximal")
    z = gamma0 - 0.1 * grad
    expected = torch.sign(z) * torch.clamp(z.abs() - 0.1 * lam, min=0)  # soft thresholding
    torch.testing.assert_close(model[1].weight.detach(), expected, atol=1e-6, rtol=1e-5)
    # threshold lr·λ = 0.3: the small γ becomes exactly 0, the others shrink
    assert (model[1].weight == 0).tolist() == [True, False, False]


@pytest.mark.parametrize("update", ["proximal", "subgradient"])
def test_a_step_skipped_by_the_grad_scaler_leaves_gamma_alone(update: str) -> None:
    """fp16 overflow: GradScaler skips the step, so neither the weights nor γ may move (the
    proximal map used to shrink γ anyway). The next, finite step updates both again."""
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 4)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=True)
    penalty = create_penalty("l1", 3.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    overflow = F.cross_entropy(model(x), y) * float("inf")  # every gradient inf/NaN
    optimizer_step(overflow, opt, scaler, penalty, [model[1].weight], update)
    assert scaler.get_scale() < 2.0**12  # the scaler did see the overflow and skipped
    for k, v in model.named_parameters():  # (BN running statistics move in any forward pass)
        assert torch.equal(v.detach(), before[k]), k
    opt.zero_grad(set_to_none=True)  # as the training loop does before every step
    optimizer_step(F.cross_entropy(model(x), y), opt, scaler, penalty, [model[1].weight], update)
    assert not torch.equal(model[1].weight.detach(), before["1.weight"])


# ---------------------------------------------------------------------------------------
# resumable state
# ---------------------------------------------------------------------------------------
def test_state_round_trip_restores_optimizer_schedule_and_rngs() -> None:
    def build() -> tuple:
        model = _tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1, 3], gamma=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        gens = {"shuffle": torch.Generator().manual_seed(0), "augment": torch.Generator().manual_seed(1)}
        return model, opt, sched, scaler, gens

    model, opt, sched, scaler, gens = build()
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    torch.randperm(10, generator=gens["shuffle"])
    loop = LoopState(epoch=3, step=2, global_step=11, best_acc=0.5, best_epoch=2,
                     partial={"loss_sum": 1.5, "seen": 16.0}, perm=torch.randperm(10))
    tensors, meta = pack_state(loop, {"seed": 0}, opt, sched, scaler, gens)
    meta = json.loads(json.dumps(meta))  # it travels as JSON metadata
    _, opt2, sched2, scaler2, gens2 = build()
    loop2 = unpack_state(tensors, meta, opt2, sched2, scaler2, gens2)
    assert loop2.epoch == 3 and loop2.step == 2 and loop2.partial == loop.partial
    assert torch.equal(loop2.perm, loop.perm)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(opt2.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])
    sched.step()
    sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    for name in gens:
        assert torch.equal(torch.rand(5, generator=gens[name]), torch.rand(5, generator=gens2[name]))


# ---------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------
def test_pick_threads_times_candidates_on_a_copy() -> None:
    from contextlib import nullcontext

    from slimcli.train.threads import candidates, pick_threads

    assert candidates(16) == [16, 8, 1] and candidates(2) == [2, 1] and candidates(1) == [1]
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chosen, timings = pick_threads(model, x, y, nullcontext)
        assert set(timings) == {2, 1} and chosen == min(timings, key=timings.__getitem__)
        assert torch.get_num_threads() == chosen
        torch.set_num_threads(1)
        assert pick_threads(model, x, y, nullcontext) == (1, {})
    finally:
        torch.set_num_threads(threads)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched too
    assert all(p.grad is None for p in model.parameters())
    rng_after = torch.get_rng_state()
    torch.set_rng_state(rng)
    assert torch.equal(rng_after, rng)
