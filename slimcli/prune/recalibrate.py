"""BatchNorm recalibration after pruning: re-estimate every running mean and variance.

A removed channel with γ ≈ 0 still output its shift β (through ReLU: relu(β)), a constant
that the next layers' BatchNorms counted in their running statistics. The slim model no
longer has that constant, so those statistics no longer fit its activations and accuracy
drops sharply right after pruning, although the weights are fine. Recalibration runs a few
thousand training images forward (no gradients, no weight changes) with the BatchNorms in
training mode and ``momentum=None``, PyTorch's cumulative average: each running statistic
becomes the mean of the per-batch statistics over all the batches, independent of their
order. Everything else stays in eval mode (dropout off) and every module's mode and
momentum are restored afterwards.

Where the only difference between the slim model and the dense model with the pruned γ
zeroed is a constant per channel before a BatchNorm (1×1 convs, linears), recalibrating both
on the same images makes them equal; with zero-padded convs the constant is not uniform at
the borders and recalibration is the best fit rather than exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from slimcli.errors import PruneError


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorms of ``model`` that keep running statistics (the ones recalibration sets)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm in ``model`` in place.

    ``batches`` are model inputs (already normalised, on the model's device); use batches of
    equal size, since the cumulative average weights every batch equally. Returns the number
    of images seen. All or nothing: if a forward pass raises, or there is no batch at all
    (a :class:`PruneError`), the previous statistics are put back.
    """
    bns = batchnorms(model)
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in bns if bn.running_mean is not None}
    seen, done = 0, False
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches, not an exponential one
            bn.train()
        for x in batches:
            model(x)
            seen += int(x.shape[0])
        done = seen > 0 or not bns
    finally:
        if not done:
            for bn, (mean, var, count) in saved.items():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    if not done:
        raise PruneError("BatchNorm recalibration got no images; give it at least one batch")
    return seen


__all__ = ["batchnorms", "recalibrate_batchnorm"]
