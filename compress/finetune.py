"""Training loop for training and fine-tuning: masks kept, optional distillation, resumable per epoch."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from compress import distributed
from compress.config import FinetuneConfig
from compress.data import Batches, Splits, TensorSplit
from compress.errors import TrainingDiverged, UsageError
from compress.tasks import Tasks, is_multitask, total_loss

Masks = dict[str, torch.Tensor]
StepHook = Callable[[int, int], None]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Evaluation:
    """Accuracy (percent) and mean cross-entropy over a split; for several tasks, per-task metrics and losses.

    With several tasks `accuracy` is that of the first task measured by accuracy (NaN when none is) and `loss`
    the weighted sum of the task losses (the training objective without label smoothing).
    """

    accuracy: float
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)   # task name -> mean metric
    losses: dict[str, float] = field(default_factory=dict)    # task name -> mean loss


@dataclass
class TrainLog:
    """What a training run did, for the report."""

    epochs: int = 0
    resumed_from_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)


def default_device() -> torch.device:
    """CUDA when present (this rank's GPU under torchrun), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.current().local_rank)
    return torch.device("cpu")


@torch.inference_mode()
def evaluate(model: nn.Module, split: TensorSplit, batch_size: int = 512,
             device: torch.device | None = None) -> Evaluation:
    """Top-1 accuracy in percent and mean cross-entropy of `model` on `split` (every task's metric and loss when
    the split has several)."""
    device = device or next(model.parameters()).device
    if is_multitask(split.tasks):
        return evaluate_tasks(model, split, split.tasks, batch_size, device)
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for x, y in Batches(split, batch_size):
        logits = model(x.to(device))
        y = y.to(device)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = max(len(split), 1)
    return Evaluation(100.0 * correct / n, total_loss / n, {"classification": 100.0 * correct / n},
                      {"classification": total_loss / n})


@torch.inference_mode()
def evaluate_tasks(model: nn.Module, split: TensorSplit, tasks: Tasks, batch_size: int = 512,
                   device: torch.device | None = None) -> Evaluation:
    """Mean metric and mean loss of every task of `model` on `split`."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    metric_sums = {t.name: 0.0 for t in tasks}
    loss_sums = {t.name: 0.0 for t in tasks}
    for x, y in Batches(split, batch_size):
        out, y = model(x.to(device)), y.to(device)
        for task in tasks:
            pred, truth = task.pick_output(out), task.pick_target(y)
            loss_sums[task.name] += float(task.item_losses(pred, truth).sum())
            metric_sums[task.name] += task.metric_sum(pred, truth)
    model.train(was_training)
    n = max(len(split), 1)
    metrics = {k: v / n for k, v in metric_sums.items()}
    losses = {k: v / n for k, v in loss_sums.items()}
    accuracy = next((metrics[t.name] for t in tasks if t.metric == "accuracy"), math.nan)
    return Evaluation(accuracy, sum(t.weight * losses[t.name] for t in tasks), metrics, losses)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, split: TensorSplit, batch_size: int = 256) -> int:
    """Re-estimate BatchNorm running statistics on `split` (cumulative average); returns the layers reset.

    Pruning or decomposing shifts every activation's statistics, and stale running means can leave a good
    model at chance accuracy until it is fine-tuned; a forward pass over calibration data fixes that cheaply.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    device = next(model.parameters()).device
    was_training, momenta = model.training, [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over all batches
    model.train()
    for x, _ in Batches(split, batch_size):
        model(x.to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)
    return len(norms)


def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every pruned weight in place (after each optimiser step, so momentum cannot revive it)."""
    if not masks:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask.to(params[name].device) == 0, 0.0)


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW; no weight decay on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def _cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig,
          teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """Label-smoothed cross-entropy, mixed with temperature-scaled KL to the teacher when distilling."""
    hard = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return hard
    t = cfg.distill_temperature
    soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * t * t
    return (1 - cfg.distill_alpha) * hard + cfg.distill_alpha * soft


def _atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary name, then rename, so a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(model: nn.Module, splits: Splits, cfg: FinetuneConfig, *, masks: Masks | None = None,
          teacher: nn.Module | None = None, step_hook: StepHook | None = None, seed: int = 0,
          checkpoint: Path | None = None, run_key: str = "", progress: Progress | None = None,
          device: torch.device | None = None) -> TrainLog:
    """Train `model` on `splits.train` for `cfg.epochs` epochs.

    Masks (parameter name -> 0/1 tensor) are re-applied after every optimiser step; `step_hook(step, total)`
    runs before each step (gradual pruning updates `masks` in place there). With `teacher`, the loss mixes in
    distillation. With `checkpoint`, state is saved after every epoch and a later call resumes from it; the
    file is removed when training completes; `run_key` names the settings, and a checkpoint made with other
    settings is refused rather than resumed. Under torchrun the model is wrapped in DistributedDataParallel,
    each rank takes its shard of every epoch, and rank 0 writes the checkpoint. A loss (or, at an epoch's end,
    a weight) that is NaN or Inf stops training with TrainingDiverged before the checkpoint is written, so it keeps
    the last good epoch.
    """
    device = device or default_device()
    masks = masks if masks is not None else {}
    tasks = _training_tasks(splits, teacher)
    rank = distributed.current()
    forward = _place(model, teacher, device, seed, masks, rank)
    batches = Batches(splits.train, cfg.batch_size, shuffle=True, seed=seed, augment=cfg.augment,
                      shard=(rank.rank, rank.world))
    total_steps = cfg.epochs * len(batches)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, total_steps, cfg.warmup_steps))
    loop = _Loop(model, forward, teacher, tasks, cfg, masks, device, optimizer, scheduler)
    log, start_epoch = TrainLog(), 0
    if checkpoint is not None and checkpoint.exists():
        start_epoch = _resume(checkpoint, run_key, model, optimizer, scheduler, masks, log)
        batches.epoch = start_epoch
    apply_masks(model, masks)
    for epoch in range(start_epoch, cfg.epochs):
        try:  # a NaN or Inf stops the run before it reaches the checkpoint, which keeps the last good epoch
            log.epoch_losses.append(_train_epoch(loop, batches, epoch, total_steps, step_hook, progress))
            _require_finite_weights(model)
        except _NotANumber as exc:
            raise _diverged(str(exc), epoch, log, checkpoint) from None
        log.epochs = epoch + 1
        if checkpoint is not None and rank.is_main:
            _save_checkpoint(checkpoint, loop, log, run_key)
        distributed.barrier()
    _finish(model, masks, checkpoint, rank)
    return log


@dataclass(frozen=True, eq=False)
class _Loop:
    """What every optimiser step of one `train` call uses."""

    model: nn.Module
    forward: nn.Module   # the DistributedDataParallel wrapper under torchrun, else `model`
    teacher: nn.Module | None
    tasks: Tasks | None  # None: one classifier
    cfg: FinetuneConfig
    masks: Masks
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training objective on one batch already on the device."""
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        if self.tasks is not None:  # several tasks: the weighted sum of their losses
            return total_loss(self.forward(x), y, self.tasks, label_smoothing=self.cfg.label_smoothing)
        return _loss(self.forward(x), y, self.cfg, teacher_logits)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser and scheduler step on a batch; returns its loss. A loss that is not a number stops before
        the step (`_NotANumber`), so the weights keep their last finite values."""
        loss = self.loss(x, y)
        value = float(loss.item())
        if not math.isfinite(value):
            raise _NotANumber(f"the loss became {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        apply_masks(self.model, self.masks)  # after the step, so momentum cannot revive a pruned weight
        return value


class _NotANumber(Exception):
    """The loss or the weights hold NaN or Inf; `train` turns it into TrainingDiverged with the epoch."""


def _require_finite_weights(model: nn.Module) -> None:
    """Raise _NotANumber naming the first parameter or buffer that holds NaN or Inf."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _NotANumber(f"{name} became NaN or Inf")


def _diverged(what: str, epoch: int, log: TrainLog, checkpoint: Path | None) -> TrainingDiverged:
    """The one-line error for a run that stopped being numbers in `epoch` (0-based), saying what is kept."""
    if checkpoint is not None and checkpoint.exists() and log.epochs:
        kept = (f"the last good checkpoint, after epoch {log.epochs}, is kept in {checkpoint} (move it away, then "
                "rerun with a lower `lr`)")
    else:
        kept = "no epoch finished, so no checkpoint was kept; rerun with a lower `lr`"
    return TrainingDiverged(f"training diverged: {what} in epoch {epoch + 1} (the learning rate may be too high "
                            f"for this model, or the data hold NaN); {kept}")


def _training_tasks(splits: Splits, teacher: nn.Module | None) -> Tasks | None:
    """The tasks whose losses `train` sums (None for one classifier); refuses a teacher for several tasks."""
    tasks = splits.train.tasks if is_multitask(splits.train.tasks) else None
    if tasks is not None and teacher is not None:
        raise UsageError("distillation is for single-task classifiers; fine-tune this multitask model without "
                         "--distill")
    return tasks


def _place(model: nn.Module, teacher: nn.Module | None, device: torch.device, seed: int, masks: Masks,
           rank: distributed.Rank) -> nn.Module:
    """Move the models to `device` and seed; returns the module whose forward trains (DDP under torchrun)."""
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    torch.manual_seed(seed)
    distributed.check_same_on_all_ranks(masks, "pruning masks")
    if rank.world <= 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _train_epoch(loop: _Loop, batches: Batches, epoch: int, total_steps: int, step_hook: StepHook | None,
                 progress: Progress | None) -> float:
    """One pass over `batches`; returns the mean loss per item."""
    loop.model.train()
    running, seen = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if step_hook is not None:
            step_hook(epoch * len(batches) + i, total_steps)
        x, y = x.to(loop.device), y.to(loop.device)
        try:
            loss = loop.step(x, y)
        except _NotANumber as exc:
            raise _NotANumber(f"{exc} at step {i + 1} of {len(batches)}") from None
        running, seen = running + loss * len(y), seen + len(y)
        if progress is not None:
            progress(f"epoch {epoch + 1}/{loop.cfg.epochs}", i + 1, len(batches))
    return running / max(seen, 1)


def _save_checkpoint(checkpoint: Path, loop: _Loop, log: TrainLog, run_key: str) -> None:
    """Everything `_resume` needs to continue after the `log.epochs` epochs done."""
    _atomic_save({"model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
                  "scheduler": loop.scheduler.state_dict(), "epoch": log.epochs, "masks": loop.masks,
                  "losses": log.epoch_losses, "run_key": run_key}, checkpoint)


def _finish(model: nn.Module, masks: Masks, checkpoint: Path | None, rank: distributed.Rank) -> None:
    """Leave the model in eval mode, check the ranks agree on the masks, and drop the finished run's checkpoint."""
    model.eval()
    distributed.check_same_on_all_ranks(masks, "pruning masks after fine-tuning")
    if checkpoint is not None and checkpoint.exists() and rank.is_main:
        checkpoint.unlink()


def _resume(checkpoint: Path, run_key: str, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, masks: Masks, log: TrainLog) -> int:
    """Restore state saved by `train` (weights-only load); returns the epoch to continue from."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state.get("run_key", "") != run_key:
        raise UsageError(f"{checkpoint.parent} holds an interrupted run with other settings; rerun those settings "
                         f"to resume it, or delete {checkpoint.parent} to start afresh")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    masks.clear()
    masks.update(state["masks"])
    log.epoch_losses = list(state["losses"])
    log.resumed_from_epoch = log.epochs = int(state["epoch"])
    return log.resumed_from_epoch
