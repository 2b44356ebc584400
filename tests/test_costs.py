"""The cost model of a backend (compress/measure/costs.py): real ONNX Runtime sessions and layers, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compress.errors import UsageError
from compress.measure.costs import (
    CostModel,
    LayerSite,
    cost_key,
    measure_model_ms,
    predict_ms,
    rank_grid,
    rest_ms,
    sites_of,
    streamed_bytes,
)
from compress.measure.latency import interleaved_rounds

FAST = {"runs": 3, "warmup": 1}  # enough to get a positive, finite price; these tests check logic, not speed


def conv_site(in_ch: int = 16, out_ch: int = 16, size: int = 8, *, kernel: int = 3, stride: int = 1,
              groups: int = 1, bias: bool = False) -> LayerSite:
    """A conv2d site at `size` x `size` input."""
    return LayerSite("conv", "conv2d", in_ch, out_ch, (kernel, kernel), (stride, stride), (kernel // 2,) * 2,
                     (1, 1), groups, bias, (in_ch, size, size))


def linear_site(in_f: int = 32, out_f: int = 10) -> LayerSite:
    return LayerSite("fc", "linear", in_f, out_f, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, (in_f,))


def costs(tmp_path: Path, **kw) -> CostModel:
    return CostModel(cache_dir=tmp_path, **{**FAST, **kw})


def test_cache_is_reused_by_a_second_model_with_the_same_key(tmp_path: Path) -> None:
    site = conv_site()
    first = costs(tmp_path)
    dense, lowrank = first.site_ms(site), first.lowrank_ms(site, 2, [8, 12])
    assert first.timed > 0 and first.cache_file.is_file()
    second = costs(tmp_path)
    assert second.site_ms(site) == dense
    np.testing.assert_array_equal(second.lowrank_ms(site, 2, [8, 12]), lowrank)
    assert second.timed == 0 and second.summary()["cached_hits"] > 0
    assert second.summary()["cache_file"] == str(first.cache_file)


@pytest.mark.parametrize("change", [{"threads": 2}, {"batch": 2}, {"backend": "pytorch-cpu"}])
def test_another_key_gets_another_file_and_times_again(tmp_path: Path, change: dict) -> None:
    site = conv_site()
    first = costs(tmp_path)
    first.site_ms(site)
    other = costs(tmp_path, **change)
    assert other.cache_file != first.cache_file
    assert other.site_ms(site) > 0 and other.timed >= 1
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_corrupt_cache_file_is_retimed_and_overwritten(tmp_path: Path) -> None:
    site = conv_site()
    first = costs(tmp_path)
    first.site_ms(site)
    for garbage in ("{not json", json.dumps({"key": first.key, "entries": {site.shape_key: "slow"}}), "[]"):
        first.cache_file.write_text(garbage)
        again = costs(tmp_path)
        assert again.site_ms(site) > 0 and again.timed >= 1
        assert json.loads(first.cache_file.read_text())["key"] == first.key


def test_lowrank_prices_one_finite_positive_value_per_rank_and_exact_on_the_grid(tmp_path: Path) -> None:
    site = conv_site(16, 32, stride=2, bias=True)
    model = costs(tmp_path)
    ranks = [1, 5, 8, 12, 16]
    prices = model.lowrank_ms(site, 2, ranks)
    assert prices.shape == (5,) and np.all(np.isfinite(prices)) and np.all(prices > 0)
    timed = model.timed
    for rank, price in zip(ranks, prices):
        if rank in rank_grid(rank):  # exact: the encoder and the decoder as site_ms prices them, from the cache
            encoder = LayerSite("e", "conv2d", 16, 2 * rank, (3, 3), (2, 2), (1, 1), (1, 1), 2, False, (16, 8, 8))
            decoder = LayerSite("d", "conv2d", 2 * rank, 32, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, (2 * rank, 4, 4))
            assert price == pytest.approx(model.site_ms(encoder) + model.site_ms(decoder), rel=1e-12)
    assert model.timed == timed  # all of those came from the cache
    assert prices[3] == pytest.approx((prices[2] + prices[4]) / 2)  # 12: halfway between the grid points 8 and 16


def test_lowrank_times_only_the_grid_points_around_the_ranks_asked_for(tmp_path: Path) -> None:
    model = costs(tmp_path)
    model.lowrank_ms(conv_site(16, 32), 1, [12])
    # the dense layer, encoder and decoder at ranks 8 and 16, and the call cost (a layer this small streams nothing)
    assert model.timed == 1 + 2 * 2 + 1


def test_lowrank_of_linear_layers_plain_and_grouped(tmp_path: Path) -> None:
    model = costs(tmp_path)
    for k in (1, 4):
        prices = model.lowrank_ms(linear_site(), k, [1, 3, 8])
        assert prices.shape == (3,) and np.all(np.isfinite(prices)) and np.all(prices > 0)


def test_rank_grid_is_fine_then_coarse() -> None:
    assert rank_grid(64) == [1, 8, 16, 24, 32, 40, 48, 56, 64]
    assert rank_grid(300)[8:] == [64, 96, 128, 160, 192, 224, 256, 384]


def test_lowrank_and_widths_refuse_shapes_that_cannot_exist(tmp_path: Path) -> None:
    model = costs(tmp_path)
    with pytest.raises(UsageError, match="divide"):
        model.lowrank_ms(conv_site(16), 3, [8])
    with pytest.raises(UsageError, match="grouped"):
        model.lowrank_ms(conv_site(16, 16, groups=16), 1, [8])
    with pytest.raises(UsageError, match="depthwise"):
        model.width_ms(conv_site(16, 16, groups=16), 8, 4)
    assert model.timed == 0


def test_width_prices_narrower_layers_lower(tmp_path: Path) -> None:
    model = costs(tmp_path, runs=5)
    site = conv_site(64, 64, 16)
    assert model.width_ms(site, 8, 8) < model.site_ms(site)  # 64x fewer MACs
    assert model.width_ms(conv_site(32, 32, groups=32), 16, 16) > 0  # depthwise stays depthwise


class Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 1))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.down(x)).mean((2, 3)))


def test_sites_of_records_the_input_each_layer_really_sees() -> None:
    model = Strided().train()
    sites = sites_of(model, torch.zeros(5, 3, 20, 20))
    assert list(sites) == ["down", "body.1", "head"]
    assert sites["down"].input_shape == (3, 20, 20) and sites["down"].output_shape == (8, 10, 10)
    assert sites["body.1"].input_shape == (8, 10, 10) and sites["body.1"].kernel == (1, 1)
    assert sites["head"] == LayerSite("head", "linear", 16, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, (16,))
    assert model.training  # restored


def test_backends_are_checked() -> None:
    with pytest.raises(UsageError, match="onnxruntime-cpu, pytorch-cpu"):
        CostModel("tensorrt")
    with pytest.raises(UsageError, match="mobile proxy"):
        CostModel("mobile-proxy")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            CostModel("pytorch-cuda")


def test_cost_key_names_what_the_table_is_valid_for() -> None:
    key = cost_key("onnxruntime-cpu", 32, 2)
    assert {"backend", "batch", "threads", "torch", "onnxruntime", "compress", "cpu"} <= set(key)
    assert key["batch"] == "32" and key["threads"] == "2" and "cuda_device" not in key
    assert all(isinstance(value, str) for value in key.values())


def test_pytorch_cpu_prices_and_restores_the_thread_count(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    model = costs(tmp_path, backend="pytorch-cpu", threads=2)
    assert model.site_ms(conv_site()) > 0 and model.lowrank_ms(linear_site(), 2, [4]).item() > 0
    assert torch.get_num_threads() == before


def test_interleaved_rounds_gives_one_series_per_callable() -> None:
    calls: list[str] = []
    series = interleaved_rounds([lambda: calls.append("a"), lambda: calls.append("b")], runs=4, warmup=1)
    assert [len(s) for s in series] == [4, 4]
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then the order flips each round


@pytest.mark.parametrize("size, kernel, stride", [(1, 3, 1), (8, 3, 1), (2, 3, 2), (5, 5, 2), (4, 1, 1)])
def test_streamed_bytes_are_the_weights_whose_taps_meet_the_input(size: int, kernel: int, stride: int) -> None:
    """Checked against autograd: a weight reaches the output iff its gradient on an all-ones input is non-zero."""
    site = conv_site(6, 4, size, kernel=kernel, stride=stride)
    conv = nn.Conv2d(6, 4, kernel, stride, kernel // 2, bias=False)
    conv(torch.ones(1, 6, size, size)).sum().backward()
    assert streamed_bytes(site) == 4 * int((conv.weight.grad != 0).sum())
    assert streamed_bytes(linear_site(32, 10)) == 4 * 32 * 10


def test_a_price_is_at_least_the_time_its_weights_take_to_stream_in(tmp_path: Path) -> None:
    """A 4 MiB 1x1 layer on a 1x1 input computes next to nothing; inside a model its weights arrive from memory
    every call, at the rate the table's probe measured (once, cached with the table)."""
    from dataclasses import replace

    from compress.measure.costs import STREAM_KEY

    site = replace(conv_site(1024, 1024, 1, kernel=1), streams=True)
    model = costs(tmp_path)
    price = model.site_ms(site)
    rate = model.entries[STREAM_KEY]
    assert rate > 0 and price >= streamed_bytes(site) * rate
    small = replace(conv_site(8, 8, 1, kernel=1), streams=True)
    assert model.site_ms(small) >= streamed_bytes(small) * rate
    again = costs(tmp_path)
    assert again.site_ms(site) == price and again.timed == 0
    # the same layer in a model that fits the core's cache keeps its one-layer price: shared entry, no floor
    assert again.site_ms(replace(site, streams=False)) <= price


def test_only_a_model_whose_weights_outgrow_a_cores_cache_streams_them() -> None:
    """The line is one core's level-2 cache, read here from sysfs independently of the code."""
    from compress.measure.costs import core_cache_bytes

    cache = Path("/sys/devices/system/cpu/cpu0/cache/index2/size")
    if cache.is_file():
        text = cache.read_text().strip()
        assert core_cache_bytes() == int(text[:-1]) * {"K": 1024, "M": 1024 ** 2}[text[-1]]
    line = core_cache_bytes() // 4  # float32 weights
    x = torch.zeros(1, 16)
    fits = nn.Sequential(nn.Linear(16, line // 16 - 1))
    outgrows = nn.Sequential(nn.Linear(16, line // 16 + 16))
    assert not any(site.streams for site in sites_of(fits, x).values())
    assert all(site.streams for site in sites_of(outgrows, x).values())
    site = next(iter(sites_of(outgrows, x).values()))
    assert site.shape_key == next(iter(sites_of(fits, x).values())).shape_key.replace(
        f">{line // 16 - 1}|", f">{line // 16 + 16}|")  # the mark is not part of the cached shape


def test_predicted_latency_of_the_builtin_classifier_and_its_decomposition(tmp_path: Path) -> None:
    from compress.methods.alds import build_lowrank
    from compress.models.builtin import ResCNN

    torch.manual_seed(0)
    original = ResCNN().eval()
    decomposed = ResCNN().eval()
    for name, k, j in (("blocks.1.conv2", 4, 16), ("blocks.2.conv2", 8, 8)):
        decomposed.set_submodule(name, build_lowrank(decomposed.get_submodule(name), k, j))
    example = torch.zeros(1, 1, 28, 28)
    model = costs(tmp_path, runs=20, warmup=3)
    measured = measure_model_ms(original, example, model, runs=30)
    rest = rest_ms(original, example, model, measured)
    assert 0 <= rest < measured
    predicted_original = predict_ms(original, example, model, rest)
    assert predicted_original == pytest.approx(measured) if rest > 0 else predicted_original >= measured
    assert len(sites_of(decomposed, example)) == 11 + 2
    predicted = predict_ms(decomposed, example, model, rest)
    # loose: a timed test on a shared machine; benchmarks/check_costs.py measures the real error (about 10%)
    assert predicted == pytest.approx(measure_model_ms(decomposed, example, model, runs=30), rel=0.5)


def test_sites_of_sees_alds_grouped_linear_encoders() -> None:
    from compress.methods.alds import build_lowrank

    model = nn.Sequential(nn.Flatten(), build_lowrank(nn.Linear(32, 10), 4, 3))
    sites = sites_of(model, torch.zeros(2, 2, 16))
    assert sites["1.encoder"] == LayerSite("1.encoder", "linear", 32, 12, (1, 1), (1, 1), (0, 0), (1, 1), 4, False,
                                           (32,))
    assert sites["1.decoder"].in_ch == 12 and sites["1.decoder"].bias
