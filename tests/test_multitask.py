"""Tasks and the multitask canvases: targets, per-task evaluation, training on the sum of task losses, mtnet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compress.config import FinetuneConfig
from compress.data import Batches, load_dataset
from compress.data.multitask import place
from compress.errors import UsageError
from compress.finetune import evaluate, train
from compress.models import load_model
from compress.models.multitask import MTNet, soft_argmax
from compress.tasks import CLASSIFICATION, Targets, Task, tasks_of, total_loss


@pytest.fixture(scope="module")
def canvas():
    return load_dataset("digits-canvas")


def test_place_puts_each_item_where_its_targets_say():
    images = np.zeros((3, 4, 4), np.float32)
    images[:, 1:3, 1:3] = 1.0
    out, masks, centres = place(images, 12, seed=1, threshold=0.5)
    for canvas_img, mask, (cx, cy) in zip(out, masks, centres):
        ys, xs = np.nonzero(mask)
        assert canvas_img.sum() == 4 and mask.sum() == 4
        assert cx * 12 == pytest.approx(xs.mean() + 0.5) and cy * 12 == pytest.approx(ys.mean() + 0.5)


def test_digits_canvas_splits(canvas):
    assert canvas.input_shape == (1, 24, 24)
    assert [t.name for t in canvas.tasks] == ["class", "mask", "position"]
    y = canvas.test.y
    assert isinstance(y, Targets) and len(y) == len(canvas.test.x)
    assert y["mask"].shape == (len(y), 1, 24, 24) and y["position"].shape == (len(y), 2)
    assert 0 < float(y["position"].min()) and float(y["position"].max()) < 1
    assert len(canvas.train) + len(canvas.calibration) + len(canvas.test) == 1797
    again = load_dataset("digits-canvas")
    assert torch.equal(again.test.x, canvas.test.x) and again.fingerprint == canvas.fingerprint
    # batches keep inputs and targets together, and never flip or shift them
    x, targets = next(iter(Batches(canvas.train, 16, shuffle=True, augment=True)))
    assert isinstance(targets, Targets) and len(targets) == len(x) == 16


def test_mtnet_outputs_and_soft_argmax():
    model = MTNet(widths=(8, 16, 16)).eval()
    logits, mask, position = model(torch.randn(2, 1, 24, 24))
    assert logits.shape == (2, 10) and mask.shape == (2, 1, 24, 24) and position.shape == (2, 2)
    heat = torch.full((1, 1, 4, 4), -1e4)
    heat[0, 0, 1, 3] = 0.0  # row 1, column 3
    assert torch.allclose(soft_argmax(heat), torch.tensor([[3.5 / 4, 1.5 / 4]]))


def test_per_task_evaluation_and_directions(canvas):
    model = MTNet(widths=(8, 16, 16))
    result = evaluate(model, canvas.test)
    assert set(result.metrics) == set(result.losses) == {"class", "mask", "position"}
    assert result.accuracy == result.metrics["class"]
    weights = {t.name: t.weight for t in canvas.tasks}
    assert result.loss == pytest.approx(sum(weights[k] * v for k, v in result.losses.items()))
    assert [t.higher_is_better for t in canvas.tasks] == [True, True, False]


def test_training_lowers_every_task_loss(canvas):
    torch.manual_seed(0)
    model = MTNet(widths=(8, 16, 16))
    before = evaluate(model, canvas.calibration)
    log = train(model, canvas, FinetuneConfig(epochs=2, lr=0.05, batch_size=32, label_smoothing=0.0),
                device=torch.device("cpu"))
    after = evaluate(model, canvas.calibration)
    assert log.epochs == 2
    for name in ("class", "mask", "position"):
        assert after.losses[name] < before.losses[name], name


def test_distillation_refused_for_multitask(canvas):
    model = MTNet(widths=(8, 16, 16))
    with pytest.raises(UsageError, match="distillation"):
        train(model, canvas, FinetuneConfig(epochs=1, distill=True), teacher=MTNet(widths=(8, 16, 16)),
              device=torch.device("cpu"))


def test_classifier_path_unchanged(digits):
    assert tasks_of(digits.test.y) == (CLASSIFICATION,)
    from tests.factories import tiny_cnn

    result = evaluate(tiny_cnn(), digits.test)
    assert result.metrics == {"classification": result.accuracy}
    assert result.losses == {"classification": result.loss}


def test_task_losses_and_metrics():
    task = Task("position", "l1", "pixel_error", scale=10.0)
    out, y = torch.tensor([[0.1, 0.2]]), torch.tensor([[0.4, 0.6]])
    assert float(task.item_losses(out, y)) == pytest.approx(0.35)
    assert task.metric_sum(out, y) == pytest.approx(5.0)  # (3, 4) pixels apart
    iou = Task("mask", "bce", "iou")
    pred = torch.tensor([[[[5.0, 5.0], [-5.0, -5.0]]]])
    truth = torch.tensor([[[[1, 0], [0, 0]]]], dtype=torch.uint8)
    assert iou.metric_sum(pred, truth) == pytest.approx(0.5)
    assert math.isfinite(float(total_loss((out,), Targets({"p": y}, ()), (Task("p", "l1", "pixel_error", 0, "p"),))))
    with pytest.raises(ValueError, match="metric"):
        Task("x", metric="f1")


def test_builtin_mtnet_defaults_to_its_data_set():
    loaded = load_model("mtnet", num_classes=10)
    assert loaded.dataset == "fashion-mnist-canvas"
    assert loaded.model(torch.randn(1, 1, 56, 56))[1].shape == (1, 1, 56, 56)
