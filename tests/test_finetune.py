"""Fine-tuning keeps masks, and an interrupted run resumes from its last finished epoch."""

from __future__ import annotations

import pytest
import torch

from compress.config import FinetuneConfig, GlobalMPConfig
from compress.finetune import evaluate, train
from compress.methods import METHODS, Context
from tests.factories import tiny_cnn


def pruned_tiny(sparsity: float = 0.9):
    """The tiny CNN pruned by GlobalMP with a 5% floor (plain 90% empties its last conv)."""
    model = tiny_cnn()
    result = METHODS["globalmp"].apply(model, GlobalMPConfig(sparsity=sparsity, min_keep=0.05),
                                       Context(torch.zeros(1)))
    return model, result.masks


def zero_positions(model, masks) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].detach() == 0 for name in masks}


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adamw", 0.01)])
def test_masks_survive_optimizer_steps(digits, optimizer, lr):
    model, masks = pruned_tiny()
    zeros = zero_positions(model, masks)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = FinetuneConfig(epochs=1, optimizer=optimizer, lr=lr, weight_decay=0.01)
    log = train(model, digits, cfg, masks=masks, seed=0)
    assert log.epochs == 1 and len(log.epoch_losses) == 1
    params = dict(model.named_parameters())
    for name, was_zero in zeros.items():
        assert (params[name][was_zero] == 0).all(), f"{name}: a pruned weight moved under {optimizer}"
        assert not torch.equal(params[name][~was_zero], before[name][~was_zero]), f"{name}: kept weights frozen"
    assert not model.training


def test_without_masks_pruned_weights_would_move(digits):
    """The control for the test above: the optimiser really does push zeros away unless masks are re-applied."""
    model, masks = pruned_tiny()
    zeros = zero_positions(model, masks)
    train(model, digits, FinetuneConfig(epochs=1, lr=0.05), seed=0)
    params = dict(model.named_parameters())
    assert any((params[name][was_zero] != 0).any() for name, was_zero in zeros.items())


def test_masked_training_learns(digits):
    """Training through the masks still learns (random init: from chance to well above it)."""
    model, masks = pruned_tiny(0.5)
    cfg = FinetuneConfig(epochs=3, lr=0.05, augment=False)
    before = evaluate(model, digits.test).accuracy
    train(model, digits, cfg, masks=masks, seed=0)
    after = evaluate(model, digits.test).accuracy
    assert before < 20.0 and after > 35.0, (before, after)


class Interrupt:
    """A progress callback that raises KeyboardInterrupt at the first batch of `epoch`."""

    def __init__(self, epoch: int, epochs: int) -> None:
        self.description = f"epoch {epoch}/{epochs}"
        self.calls: list[tuple[str, int]] = []

    def __call__(self, description: str, done: int, total: int) -> None:
        self.calls.append((description, done))
        if description == self.description:
            raise KeyboardInterrupt


def test_interrupted_finetune_resumes(digits, tmp_path):
    cfg = FinetuneConfig(epochs=2, lr=0.05)
    checkpoint = tmp_path / "finetune.ckpt"

    # the uninterrupted reference
    ref_model, ref_masks = pruned_tiny()
    ref_log = train(ref_model, digits, cfg, masks=ref_masks, seed=0)
    assert ref_log.resumed_from_epoch == 0

    model, masks = pruned_tiny()
    zeros = zero_positions(model, masks)
    interrupt = Interrupt(2, 2)
    with pytest.raises(KeyboardInterrupt):
        train(model, digits, cfg, masks=masks, seed=0, checkpoint=checkpoint, progress=interrupt)
    assert checkpoint.exists(), "no checkpoint after the first finished epoch"
    assert interrupt.calls[-1] == ("epoch 2/2", 1)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["losses"]) == 1

    # a new process: a freshly pruned model and empty masks, which the checkpoint fills
    resumed_model, _ = pruned_tiny()
    resumed_masks: dict[str, torch.Tensor] = {}
    progress: list[str] = []
    log = train(resumed_model, digits, cfg, masks=resumed_masks, seed=0, checkpoint=checkpoint,
                progress=lambda d, i, n: progress.append(d))
    assert log.resumed_from_epoch == 1
    assert log.epochs == 2 and len(log.epoch_losses) == 2
    assert set(progress) == {"epoch 2/2"}  # epoch 1 was not run again
    assert not checkpoint.exists()
    assert sorted(resumed_masks) == sorted(masks)
    params = dict(resumed_model.named_parameters())
    for name, was_zero in zeros.items():
        assert (params[name][was_zero] == 0).all(), name

    # resuming is exact: the same weights as the run that was never interrupted
    assert log.epoch_losses == pytest.approx(ref_log.epoch_losses, rel=1e-6)
    ref_state = ref_model.state_dict()
    for name, value in resumed_model.state_dict().items():
        assert torch.allclose(value, ref_state[name], rtol=1e-5, atol=1e-6), name


def test_finetune_config_validation():
    from compress.errors import UsageError

    for kwargs in ({"epochs": -1}, {"optimizer": "lion"}, {"lr": 0.0}, {"batch_size": 0}, {"distill_alpha": 2.0}):
        with pytest.raises(UsageError):
            FinetuneConfig(**kwargs)


def test_checkpoint_of_other_settings_is_refused_not_resumed(digits, tmp_path):
    from compress.errors import UsageError

    cfg = FinetuneConfig(epochs=2, lr=0.05)
    checkpoint = tmp_path / "finetune.ckpt"
    model, masks = pruned_tiny()
    with pytest.raises(KeyboardInterrupt):
        train(model, digits, cfg, masks=masks, seed=0, checkpoint=checkpoint, run_key="a", progress=Interrupt(2, 2))
    other, other_masks = pruned_tiny(0.5)
    with pytest.raises(UsageError, match="other settings"):
        train(other, digits, cfg, masks=other_masks, seed=0, checkpoint=checkpoint, run_key="b")
    assert checkpoint.exists(), "the interrupted run is kept for its own settings"


def test_batchnorm_recalibration_matches_the_data_statistics(digits):
    from compress.finetune import recalibrate_batchnorm

    model, _ = pruned_tiny()
    first_norm = model.features[1]
    first_norm.running_mean.fill_(5.0)  # stale statistics, as after pruning
    assert recalibrate_batchnorm(model, digits.calibration) == 3
    with torch.no_grad():
        conv_out = model.features[0](digits.calibration.x)
    expected = conv_out.mean(dim=(0, 2, 3))
    assert torch.allclose(first_norm.running_mean, expected, atol=1e-4)
    assert first_norm.momentum == 0.1, "the layer's own momentum is restored"


def test_prune_reports_recalibration_and_can_skip_it(tmp_path):
    from compress import api
    from tests.conftest import TINY_SPEC

    def run(name: str, recalibrate: bool) -> dict:
        return api.prune(api.ModelSource(spec=TINY_SPEC), GlobalMPConfig(sparsity=0.9),
                         api.RunOptions(out=tmp_path / name, data="digits", latency=False, recalibrate_bn=recalibrate))

    assert run("on", True)["bn_recalibration"]["layers"] == 3
    skipped = run("off", False)
    assert skipped["bn_recalibration"]["layers"] == 0
    assert skipped["bn_recalibration"]["accuracy_before"] is None
