"""The cost model of a target backend: per-layer times of Conv2d/Linear layers and of the shapes a method could
give them, measured on that backend at the layer's real input shape, batch and threads, and cached on disk.

A layer is timed as a one-layer graph on random weights, repeated with warm caches, the way it runs inside a model:

- ONNX Runtime: the node built with `onnx.helper` (Conv; Gemm, or MatMul + Add, for a linear layer; Reshape,
  MatMul, Reshape for a grouped linear one), optimised by ORT itself, then freed of the layout conversions that a
  one-layer graph has and a layer between blocked (NCHWc) layers does not, or given those that an NCHW layer pays
  inside a model (see `_in_chain`); run with inputs and outputs bound, in an `export.ort_session` with the given
  intra-op threads; the cost of the session call itself (timed once per table on an Identity graph) is taken off.
  Plain one-layer graphs summed to about 2x the measured model (rescnn, batch 1 and 32).
- PyTorch (CPU, CUDA synchronised): the nn.Module itself, in eval and inference mode, with the thread count set and
  restored.

A variant of a layer (another rank, other widths) is timed in rounds shared with the layer's dense form alone
(`compress.measure.latency.interleaved_rounds`, the order flipped each round) and priced as the dense time times
the median of the per-round ratios, so that drift hits both alike. The table is cached as one JSON file per key
(`cost_key`: backend, batch, threads, versions, CPU, GPU) under `cache_dir` (default `$COMPRESS_CACHE_DIR`, else
`~/.cache/compress/costs`), named by a hash of the key; an entry is keyed by the layer's shape, not its name, so
equal layers share one. A second `CostModel` with the same key times nothing; a file it cannot read is ignored and
rewritten.

A whole model's latency is predicted as the part outside its Conv2d/Linear layers (`rest_ms`, measured once on the
original model) plus the sum of its layers' prices (`predict_ms`). A one-layer graph keeps its weights in the
core's caches from call to call; inside a model whose weights outgrow a core's level-2 cache (`sites_of` marks
its sites `streams`) they arrive from memory every call, so no such layer is priced below its weights' bytes
(`streamed_bytes`) at the rate a chain of distinct weight-heavy layers reads them on this machine (timed once per
table); a model that fits (the built-in classifier: 1.2 MB) keeps its weights close and its one-layer prices.
Without that floor, mobilenet_v2's last 1x1 layers ran 3-4x their price and
`rest_ms` absorbed the difference, so decomposing them looked like it saved almost nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import compress
from compress import export
from compress.errors import UsageError
from compress.measure.backends import MOBILE_PROXY, ONNXRUNTIME_CPU, PYTORCH_CPU, PYTORCH_CUDA
from compress.measure.conditions import _cpu_model, _version
from compress.measure.latency import interleaved_rounds, torch_threads

COST_BACKENDS = (ONNXRUNTIME_CPU, PYTORCH_CPU, PYTORCH_CUDA)
CACHE_FORMAT = "4"  # bump when the way a variant is built or timed changes: old tables then stop matching
CACHE_ENV = "COMPRESS_CACHE_DIR"
OPSET, IR_VERSION = export.OPSET, 8  # IR 8 is the oldest that opset 17 allows: any onnxruntime loads it
RANK_STEP, RANK_FINE_LIMIT = 8, 64  # ranks timed exactly: 1, multiples of 8 up to 64 ...
RANK_MID_STEP, RANK_MID_LIMIT = 32, 256  # ... then multiples of 32 up to 256, then multiples of 128
RANK_COARSE_STEP = 128
NCHWC_DOMAIN = "com.microsoft.nchwc"
CALL_KEY = "call|session"  # the cache entry of the cost of calling a one-layer graph, beyond its layer
MIN_SHARE = 0.1  # a layer is never priced below this share of its timed one-layer graph
WEIGHT_BYTES = 4  # float32
STREAM_KEY = "stream|ms_per_byte"  # the cache entry of what reading a byte of weights costs inside a model
DEFAULT_CORE_CACHE = 2 ** 20  # bytes of level-2 cache per core assumed where sysfs does not say
STREAM_LAYERS, STREAM_WIDTH = 16, 512  # the probe: 16 distinct 512x512 1x1 convolutions (16 MiB) in one graph


# ------------------------------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class LayerSite:
    """One Conv2d or Linear layer as it runs in the model: its shape and the input one item gives it.

    `input_shape` excludes the batch: (C, H, W) for conv2d, (..., C) for linear. A grouped linear layer (ALDS's
    encoder) is op "linear" with `groups` > 1; a linear layer has kernel, stride and dilation (1, 1), padding
    (0, 0). `streams` marks a layer of a model whose weights outgrow a core's level-2 cache (see `sites_of`).
    """

    name: str
    op: str  # "conv2d" | "linear"
    in_ch: int
    out_ch: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    input_shape: tuple[int, ...]
    streams: bool = False  # not part of the shape key: the same layer in either model shares one timing

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The output of one item: (out_ch, H', W') for conv2d, (..., out_ch) for linear."""
        if self.op == "linear":
            return (*self.input_shape[:-1], self.out_ch)
        spatial = [(size + 2 * pad - dil * (k - 1) - 1) // step + 1 for size, pad, dil, k, step in
                   zip(self.input_shape[1:], self.padding, self.dilation, self.kernel, self.stride)]
        return (self.out_ch, *spatial)

    @property
    def shape_key(self) -> str:
        """What the price depends on (everything but the name), as a cache key."""
        def dims(values: Sequence[int]) -> str:
            return "x".join(map(str, values))
        return (f"{self.op}|{self.in_ch}>{self.out_ch}|k{dims(self.kernel)}|s{dims(self.stride)}|"
                f"p{dims(self.padding)}|d{dims(self.dilation)}|g{self.groups}|b{int(self.bias)}|"
                f"in{dims(self.input_shape)}")


def _pair(value: Any) -> tuple[int, int]:
    """An int or a pair as a pair of ints."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """The symmetric padding of a conv, resolving "valid" and "same" (odd effective kernels)."""
    if module.padding == "valid":
        return 0, 0
    if module.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))  # type: ignore[return-value]
    return _pair(module.padding)


def _is_grouped_linear(module: nn.Module) -> bool:
    """A leaf with a (out, in/groups) weight and in/out features and groups, like ALDS's GroupedLinear."""
    # duck-typed: the class lives in compress.methods (a higher layer), which this module may not import
    return (not isinstance(module, nn.Linear) and all(hasattr(module, a) for a in ("in_features", "out_features",
                                                                                   "groups", "weight"))
            and not list(module.children()))


def is_priced(module: nn.Module) -> bool:
    """Whether the cost model prices `module`: a Conv2d, a Linear or a grouped linear layer."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) or _is_grouped_linear(module)


def site_of(name: str, module: nn.Module, input_shape: tuple[int, ...]) -> LayerSite:
    """The site of one Conv2d, Linear or grouped linear layer given one item's input shape."""
    if isinstance(module, nn.Conv2d):
        return LayerSite(name, "conv2d", module.in_channels, module.out_channels, _pair(module.kernel_size),
                         _pair(module.stride), _conv_padding(module), _pair(module.dilation), module.groups,
                         module.bias is not None, tuple(input_shape))
    bias = getattr(module, "bias", None) is not None
    groups = 1 if isinstance(module, nn.Linear) else int(module.groups)
    return LayerSite(name, "linear", int(module.in_features), int(module.out_features), (1, 1), (1, 1), (0, 0),
                     (1, 1), groups, bias, tuple(input_shape))


def sites_of(model: nn.Module, example: torch.Tensor) -> dict[str, LayerSite]:
    """Every Conv2d/Linear leaf of `model` (and grouped linear layers) with the input shape it really sees.

    One forward pass on `example[:1]` in eval mode with forward hooks records each layer's input; the model's
    training mode is restored afterwards. Layers that the forward pass does not reach are left out. The keys are
    the modules' qualified names, in the order the forward pass calls them. Every site is marked `streams` when the
    weights the layers read (`streamed_bytes`) add up to more than one core's level-2 cache.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if is_priced(module):
            def hook(_module: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
                shapes.setdefault(name, tuple(args[0].shape[1:]))
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            model.eval()(example[:1].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    sites = {name: site_of(name, modules[name], shape) for name, shape in shapes.items()}
    streams = sum(streamed_bytes(site) for site in sites.values()) > core_cache_bytes()
    return {name: replace(site, streams=streams) for name, site in sites.items()}


@functools.cache
def core_cache_bytes() -> int:
    """The size of one core's level-2 cache (Linux sysfs; DEFAULT_CORE_CACHE where it cannot be read)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                units = {"K": 2 ** 10, "M": 2 ** 20}
                return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        except (OSError, ValueError):
            break
    return DEFAULT_CORE_CACHE


# ------------------------------------------------------------------------------------------------- key and cache


def cost_key(backend: str, batch: int, threads: int) -> dict[str, str]:
    """What a cost table is valid for: backend, batch, threads, versions, the CPU (and the GPU for CUDA)."""
    key = {"format": CACHE_FORMAT, "backend": backend, "batch": str(batch), "threads": str(threads),
           "torch": torch.__version__, "onnx": str(_version("onnx")), "onnxruntime": str(_version("onnxruntime")),
           "compress": compress.__version__, "cpu": _cpu_model()}
    if backend == PYTORCH_CUDA:
        key["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return key


def default_cache_dir() -> Path:
    """$COMPRESS_CACHE_DIR, else ~/.cache/compress/costs."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "compress" / "costs"


def _cache_file(cache_dir: Path, key: dict[str, str]) -> Path:
    """One file per key, named by a hash of it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"costs-{digest}.json"


def _read_entries(path: Path, key: dict[str, str]) -> dict[str, float]:
    """The entries of a cache file written for `key`; empty when it is missing, unreadable or for another key."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return {}
        entries = {str(k): float(v) for k, v in data["entries"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # a corrupt or foreign file is re-timed and overwritten, never an error
    return {k: v for k, v in entries.items() if np.isfinite(v) and v > 0}


def _write_entries(path: Path, key: dict[str, str], entries: dict[str, float]) -> None:
    """Write the table to a temporary file beside `path` and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"key": key, "entries": dict(sorted(entries.items()))}, handle, indent=0)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- variants


def _encoder_decoder(site: LayerSite, k: int, rank: int) -> tuple[LayerSite, LayerSite]:
    """ALDS's replacement of `site` at k groups and rank `rank` per group: encoder and decoder sites."""
    width = k * rank
    if site.op == "conv2d":
        encoder = replace(site, name=f"{site.name}.encoder", out_ch=width, groups=k, bias=False)
        out = site.output_shape
        decoder = LayerSite(f"{site.name}.decoder", "conv2d", width, site.out_ch, (1, 1), (1, 1), (0, 0), (1, 1),
                            1, site.bias, (width, *out[1:]), site.streams)
    else:
        encoder = replace(site, name=f"{site.name}.encoder", out_ch=width, groups=k, bias=False)
        decoder = replace(site, name=f"{site.name}.decoder", in_ch=width, groups=1,
                          input_shape=(*site.input_shape[:-1], width))
    return encoder, decoder


def rank_grid(upto: int) -> list[int]:
    """The ranks timed exactly, up to the first one at or above `upto`: 1, 8, 16, ..., 64, 96, ..., 256, 384, ..."""
    grid, rank = [1], RANK_STEP
    while grid[-1] < upto:
        grid.append(rank)
        step = RANK_STEP if rank < RANK_FINE_LIMIT else RANK_MID_STEP if rank < RANK_MID_LIMIT else RANK_COARSE_STEP
        rank += step
    return grid


def _bracket(rank: int, grid: list[int]) -> tuple[int, int]:
    """The grid points at or around `rank` (the same point twice when it is on the grid)."""
    index = int(np.searchsorted(grid, rank))
    return (rank, rank) if grid[index] == rank else (grid[index - 1], grid[index])


def _item_input(site: LayerSite, in_ch: int) -> tuple[int, ...]:
    """The site's input shape with `in_ch` channels."""
    if site.op == "conv2d":
        return (in_ch, *site.input_shape[1:])
    return (*site.input_shape[:-1], in_ch)


# ------------------------------------------------------------------------------------------------- runners


def _random(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Float32 values in [-1, 1): what a layer's weights or inputs look like to the kernels."""
    return rng.uniform(-1.0, 1.0, size=tuple(shape)).astype(np.float32)


def _onnx_graph(site: LayerSite, rng: np.random.Generator) -> Any:
    """A one-layer ONNX model of `site` (random weights), with a dynamic batch axis like `export.export_onnx`."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info(export.INPUT, TensorProto.FLOAT, ["batch", *site.input_shape])
    y = helper.make_tensor_value_info(export.OUTPUT, TensorProto.FLOAT, None)
    inits, nodes = [], []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    if site.op == "conv2d":
        weight = init("W", _random((site.out_ch, site.in_ch // site.groups, *site.kernel), rng))
        inputs = [export.INPUT, weight] + ([init("B", _random((site.out_ch,), rng))] if site.bias else [])
        pads = [*site.padding, *site.padding]
        nodes.append(helper.make_node("Conv", inputs, [export.OUTPUT], kernel_shape=list(site.kernel),
                                      strides=list(site.stride), pads=pads, dilations=list(site.dilation),
                                      group=site.groups))
    elif site.groups > 1:  # ALDS's GroupedLinear exports as Reshape, batched MatMul, Reshape
        g, lead = site.groups, len(site.input_shape)  # leading dims: the batch and all but the last input dim
        weight = init("W", _random((g, site.in_ch // g, site.out_ch // g), rng))
        split = init("split", np.array([0] * lead + [g, 1, site.in_ch // g], dtype=np.int64))
        merge = init("merge", np.array([0] * lead + [site.out_ch], dtype=np.int64))
        nodes += [helper.make_node("Reshape", [export.INPUT, split], ["parts"]),
                  helper.make_node("MatMul", ["parts", weight], ["products"]),
                  helper.make_node("Reshape", ["products", merge], [export.OUTPUT])]
    elif len(site.input_shape) == 1:  # torch exports a 2-D Linear as Gemm
        weight = init("W", _random((site.out_ch, site.in_ch), rng))
        inputs = [export.INPUT, weight] + ([init("B", _random((site.out_ch,), rng))] if site.bias else [])
        nodes.append(helper.make_node("Gemm", inputs, [export.OUTPUT], transB=1))
    else:  # and a Linear on more dims as MatMul (+ Add)
        weight = init("W", _random((site.in_ch, site.out_ch), rng))
        product = "product" if site.bias else export.OUTPUT
        nodes.append(helper.make_node("MatMul", [export.INPUT, weight], [product]))
        if site.bias:
            nodes.append(helper.make_node("Add", [product, init("B", _random((site.out_ch,), rng))],
                                          [export.OUTPUT]))
    graph = helper.make_graph(nodes, site.shape_key, [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def runtime_graph(source: Path, target: Path) -> Any:
    """The graph ONNX Runtime runs for `source` (all optimisations, NCHWc layout included), saved at `target`."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # it warns that the saved graph holds CPU-specific (NCHWc) nodes: we want them
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    return onnx.load(str(target))


@functools.cache
def nchwc_block() -> int:
    """Channels per ONNX Runtime NCHWc block on this CPU (16 with AVX-512, 8 with AVX2; 1 where it has no blocked
    kernels), probed once per process: ORT pads a 1-channel conv's output to one block."""
    probe = LayerSite("probe", "conv2d", 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), 1, False, (1, 4, 4))
    with tempfile.TemporaryDirectory(prefix="compress-costs-") as tmp:
        import onnx

        onnx.save(_onnx_graph(probe, np.random.default_rng(0)), str(Path(tmp) / "probe.onnx"))
        graph = runtime_graph(Path(tmp) / "probe.onnx", Path(tmp) / "probe.opt.onnx").graph
    if not any(node.domain == NCHWC_DOMAIN for node in graph.node):
        return 1
    weight = next(init for init in graph.initializer if init.name == graph.node[0].input[1])
    return int(weight.dims[0])


def _in_chain(plain: Path, target: Path, site: LayerSite, block: int) -> Path:
    """The site's optimised graph as it runs between blocked (NCHWc) layers; returns `target`.

    ONNX Runtime runs a convolution between NCHWc layers without converting its input and output, so the
    conversions (ReorderInput, ReorderOutput) that its one-layer graph has at either end are dropped and the graph
    takes and gives blocked tensors. A convolution that ORT keeps in NCHW (a grouped one with few channels per
    group) pays those conversions inside a model instead, so they are added around it: before it when its input
    has at least a block of channels (a blocked layer wrote it), after it when the next layer can read its output
    in blocks. Non-conv sites, and an input with fewer channels than a block (read as NCHW: a model's first
    layer), are left as they are. Two NCHW layers reading the same tensor (a residual block's conv1 and shortcut)
    share one conversion inside a model but pay one each here: a small over-estimate.
    """
    import onnx
    from onnx import helper

    model = runtime_graph(plain, target)
    graph = model.graph
    nodes = list(graph.node)
    if site.op != "conv2d" or block <= 1:
        return target
    channels = _round_up(site.in_ch, block)
    blocked_in = [export.INPUT, "batch", channels, *site.input_shape[1:]]
    if nodes[0].op_type == "ReorderInput":  # a blocked conv: drop the conversions at its ends
        first = nodes.pop(0)
        _rename(nodes, first.output[0], export.INPUT)
        _set_input(graph, blocked_in)
    elif nodes[0].domain != NCHWC_DOMAIN and site.in_ch >= block:  # an NCHW conv: add them (where they apply)
        nodes.insert(0, helper.make_node("ReorderOutput", [export.INPUT], ["nchw_input"], domain=NCHWC_DOMAIN,
                                         channels=site.in_ch, channels_last=0))
        _rename(nodes[1:], export.INPUT, "nchw_input")
        _set_input(graph, blocked_in)
    if nodes[-1].op_type == "ReorderOutput":
        last = nodes.pop()
        _rename(nodes, last.input[0], export.OUTPUT)
    elif nodes[-1].domain != NCHWC_DOMAIN and _blocked_input(site.out_ch, block):
        _rename(nodes, export.OUTPUT, "nchw_output")
        nodes.append(helper.make_node("ReorderInput", ["nchw_output"], [export.OUTPUT], domain=NCHWC_DOMAIN,
                                      channels_last=0))
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(op.domain == NCHWC_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
    onnx.save(model, str(target))
    return target


def _blocked_input(channels: int, block: int) -> bool:
    """Whether ORT's NCHWc convolutions read a tensor of `channels` in blocks (at least a block, and 4 | channels)."""
    # fewer channels than a block are read as NCHW directly; other counts that 4 does not divide stay NCHW
    return channels >= block and channels % 4 == 0


def _round_up(value: int, step: int) -> int:
    """`value` rounded up to a multiple of `step`."""
    return -(-value // step) * step


def _rename(nodes: Sequence[Any], old: str, new: str) -> None:
    """Make every input and output of `nodes` named `old` be named `new`."""
    for node in nodes:
        for edges in (node.input, node.output):
            for i, name in enumerate(edges):
                if name == old:
                    edges[i] = new


def _set_input(graph: Any, spec: list) -> None:
    """Replace the graph's only input by one named spec[0] of float shape spec[1:]."""
    from onnx import TensorProto, helper

    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(spec[0], TensorProto.FLOAT, spec[1:]))


def _trivial_graph(workdir: Path) -> Path:
    """A graph that does next to nothing (Identity on one float): the cost of a session call alone."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", [export.INPUT], [export.OUTPUT])], "call",
                              [helper.make_tensor_value_info(export.INPUT, TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info(export.OUTPUT, TensorProto.FLOAT, [1])])
    path = workdir / "call.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION),
              str(path))
    return path


def _stream_graph(workdir: Path, rng: np.random.Generator) -> Path:
    """STREAM_LAYERS distinct STREAM_WIDTH-channel 1x1 convolutions in a row on a 1x1 input: weights read, little
    computed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width, nodes, inits = STREAM_WIDTH, [], []
    for index in range(STREAM_LAYERS):
        weight = f"W{index}"
        inits.append(numpy_helper.from_array(_random((width, width, 1, 1), rng) / width, weight))
        source = export.INPUT if index == 0 else f"h{index - 1}"
        target = export.OUTPUT if index == STREAM_LAYERS - 1 else f"h{index}"
        nodes.append(helper.make_node("Conv", [source, weight], [target], kernel_shape=[1, 1]))
    graph = helper.make_graph(nodes, "stream",
                              [helper.make_tensor_value_info(export.INPUT, TensorProto.FLOAT, ["batch", width, 1, 1])],
                              [helper.make_tensor_value_info(export.OUTPUT, TensorProto.FLOAT, None)],
                              initializer=inits)
    path = workdir / "stream.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION),
              str(path))
    return path


def streamed_bytes(site: LayerSite) -> int:
    """The weight bytes a layer reads per call: every weight whose kernel tap meets the input somewhere (a 3x3
    kernel on a 1x1 input, padded, reads its centre tap only)."""
    per_tap = site.out_ch * (site.in_ch // site.groups)
    if site.op != "conv2d":
        return per_tap * WEIGHT_BYTES
    taps = 1
    for size, k, step, pad, dil in zip(site.input_shape[1:], site.kernel, site.stride, site.padding, site.dilation):
        outputs = range((size + 2 * pad - dil * (k - 1) - 1) // step + 1)
        taps *= sum(any(0 <= o * step - pad + t * dil < size for o in outputs) for t in range(k))
    return per_tap * taps * WEIGHT_BYTES


def _bound_call(session: Any, batch: int, rng: np.random.Generator) -> Callable[[], object]:
    """A call running `session` on a random input of its shape at `batch`, with inputs and outputs bound.

    IO binding keeps the output in ONNX Runtime's arena instead of copying it into a fresh NumPy array each call:
    inside a model, a layer's output goes straight to the next layer.
    """
    import onnxruntime as ort

    spec = session.get_inputs()[0]
    shape = [batch if not isinstance(d, int) else d for d in spec.shape]
    value = ort.OrtValue.ortvalue_from_numpy(_random(shape, rng))
    binding = session.io_binding()
    binding.bind_ortvalue_input(spec.name, value)
    binding.bind_output(session.get_outputs()[0].name)
    session.run_with_iobinding(binding)  # the first call allocates the output; later calls reuse its arena block
    return lambda: session.run_with_iobinding(binding)


class _GroupedMatmul(nn.Module):
    """ALDS's GroupedLinear forward (one broadcast matmul over `groups` slices of the features)."""

    def __init__(self, site: LayerSite) -> None:
        super().__init__()
        self.groups, self.in_ch = site.groups, site.in_ch
        self.weight = nn.Parameter(torch.randn(site.groups, site.in_ch // site.groups, site.out_ch // site.groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.unflatten(-1, (self.groups, self.in_ch // self.groups)).unsqueeze(-2)
        return torch.matmul(parts, self.weight).flatten(-3)


def _torch_layer(site: LayerSite) -> nn.Module:
    """The site as a fresh nn.Module (random weights)."""
    if site.op == "conv2d":
        return nn.Conv2d(site.in_ch, site.out_ch, site.kernel, site.stride, site.padding, site.dilation,
                         site.groups, site.bias)
    if site.groups > 1:
        return _GroupedMatmul(site)
    return nn.Linear(site.in_ch, site.out_ch, bias=site.bias)


# ------------------------------------------------------------------------------------------------- the model


class CostModel:
    """Per-layer prices (milliseconds) on one backend at one batch size and thread count, cached on disk.

    Backends: "onnxruntime-cpu" (default), "pytorch-cpu", and "pytorch-cuda" where a GPU is visible. The mobile
    proxy is refused: its layers are int8 QDQ graphs calibrated and converted per variant, which would cost
    seconds per table entry. Each layer or variant is timed over `runs` rounds after `warmup`.

    Prices come from the cache file of `cost_key(backend, batch, threads)` under `cache_dir` when it has them;
    each miss is timed (counted in `timed`, the wall time in `seconds_timing`) and the file rewritten after
    each layer's variants, so a run that stops keeps what it timed.
    """

    def __init__(self, backend: str = ONNXRUNTIME_CPU, *, batch: int = 1, threads: int = 1,
                 cache_dir: Path | None = None, runs: int = 15, warmup: int = 3) -> None:
        if backend not in COST_BACKENDS:
            why = ("the mobile proxy's int8 graphs need a calibration and an ORT conversion per variant, too slow "
                   "for a cost table; " if backend == MOBILE_PROXY else "")
            raise UsageError(f"cost model backend {backend!r} is not supported; {why}choose from "
                             f"{', '.join(COST_BACKENDS)}")
        if backend == PYTORCH_CUDA and not torch.cuda.is_available():
            raise UsageError(f"cost model backend {PYTORCH_CUDA} needs a CUDA GPU and none is visible; choose "
                             f"{ONNXRUNTIME_CPU} or {PYTORCH_CPU}")
        if batch < 1 or threads < 1 or runs < 1 or warmup < 0:
            raise UsageError(f"cost model batch {batch}, threads {threads} and runs {runs} must be >= 1, "
                             f"warm-up {warmup} >= 0")
        self.backend, self.batch, self.threads, self.runs, self.warmup = backend, batch, threads, runs, warmup
        self.key = cost_key(backend, batch, threads)
        self.cache_file = _cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), self.key)
        self.entries: dict[str, float] = _read_entries(self.cache_file, self.key)
        self.timed = 0
        self.hits = 0
        self.seconds_timing = 0.0
        self._rng = np.random.default_rng(0)

    # ---- public prices

    def site_ms(self, site: LayerSite) -> float:
        """The layer as it is (any groups), in milliseconds, at this model's batch and threads."""
        return self.sites_ms([site])[0]

    def sites_ms(self, sites: Sequence[LayerSite]) -> list[float]:
        """Prices of several layers (each uncached one timed on its own), in milliseconds."""
        missing = list({s.shape_key: s for s in sites if s.shape_key not in self.entries}.values())
        self.hits += len({s.shape_key for s in sites}) - len(missing)
        for site in missing:  # each is its own dense layer
            self._time(site, [])
        return [self._price(s) for s in sites]

    def lowrank_ms(self, site: LayerSite, k: int, ranks: Sequence[int]) -> np.ndarray:
        """Price of ALDS's replacement of `site` with `k` groups at each rank j in `ranks`, in milliseconds.

        The replacement is an encoder (conv in_ch -> k*j with groups=k and the layer's kernel, stride, padding and
        dilation, no bias; for a linear layer, Linear in -> j when k == 1, else a grouped matmul) followed by a
        decoder (1x1 conv or Linear k*j -> out_ch, with the layer's bias); its price is the sum of both.

        Only ranks on the grid `rank_grid` are timed: 1, every multiple of 8 up to 64, every multiple of 32 up to
        256, then every multiple of 128. A requested rank on the grid is priced exactly (its price equals
        `site_ms(encoder) + site_ms(decoder)`); another is interpolated linearly between the grid points around
        it, and only those points are timed. The variants are timed interleaved with the dense layer.
        """
        ranks = [int(r) for r in ranks]
        if site.groups != 1:
            raise UsageError(f"cannot price a low-rank form of {site.name!r}: it is already grouped "
                             f"(groups={site.groups})")
        if k < 1 or site.in_ch % k:
            raise UsageError(f"groups {k} must divide the {site.in_ch} input channels of {site.name!r}")
        if not ranks:
            return np.zeros(0)
        if min(ranks) < 1:
            raise UsageError(f"ranks must be >= 1, got {min(ranks)} for {site.name!r}")
        grid = rank_grid(max(ranks))
        points = sorted({p for r in ranks for p in _bracket(r, grid)})
        forms = {p: _encoder_decoder(site, k, p) for p in points}
        self._ensure(site, [part for pair in forms.values() for part in pair])
        priced = np.array([self._price(enc) + self._price(dec) for enc, dec in forms.values()])
        return np.interp(np.array(ranks, dtype=float), np.array(points, dtype=float), priced)

    def width_ms(self, site: LayerSite, in_ch: int, out_ch: int) -> float:
        """The layer with `in_ch` input and `out_ch` output channels (channel pruning), in milliseconds.

        A depthwise layer (groups == in == out) stays depthwise, so `in_ch` must equal `out_ch`; another grouped
        layer keeps its group count, which must divide both. Timed interleaved with the layer as it is.
        """
        if in_ch < 1 or out_ch < 1:
            raise UsageError(f"widths of {site.name!r} must be >= 1, got {in_ch} -> {out_ch}")
        groups = site.groups
        if site.groups > 1 and site.groups == site.in_ch == site.out_ch:
            if in_ch != out_ch:
                raise UsageError(f"depthwise layer {site.name!r} needs equal widths, got {in_ch} -> {out_ch}")
            groups = in_ch
        elif in_ch % groups or out_ch % groups:
            raise UsageError(f"groups {groups} of {site.name!r} must divide the widths {in_ch} -> {out_ch}")
        variant = replace(site, in_ch=in_ch, out_ch=out_ch, groups=groups, input_shape=_item_input(site, in_ch))
        self._ensure(site, [variant])
        return self._price(variant)

    def save(self) -> None:
        """Write the table to its cache file (merged with what another process wrote meanwhile), atomically."""
        merged = {**_read_entries(self.cache_file, self.key), **self.entries}
        _write_entries(self.cache_file, self.key, merged)

    def summary(self) -> dict:
        """Key, entries, variants timed and cache hits in this process, seconds spent timing, the cache file."""
        return {"key": dict(self.key), "entries": len(self.entries), "timed": self.timed, "cached_hits": self.hits,
                "seconds_timing": round(self.seconds_timing, 3), "cache_file": str(self.cache_file)}

    # ---- timing

    def _price(self, site: LayerSite) -> float:
        """A cached price less the cost of calling a one-layer graph, and for a site of a model whose weights
        outgrow the core's cache at least the time its weights take to stream in, in milliseconds."""
        raw = self.entries[site.shape_key]
        price = max(raw - self._call_ms(), MIN_SHARE * raw)
        return max(price, streamed_bytes(site) * self._stream_ms_per_byte()) if site.streams else price

    def _stream_ms_per_byte(self) -> float:
        """What a byte of weights costs a layer inside a model, read once per call (0 off ONNX Runtime).

        A layer timed alone keeps its weights in the core's caches from call to call; inside a model each layer's
        weights arrive from memory every call, so a layer that does little with many weights (mobilenet_v2's last
        1x1 layers at 1x1 spatial) ran 3-4x its one-layer price (ORT profile). Timed once per table as a chain of
        STREAM_LAYERS distinct 1x1 convolutions with next to no compute, whose weights cannot all stay close.
        """
        if self.backend != ONNXRUNTIME_CPU:
            return 0.0
        if STREAM_KEY not in self.entries:
            chain_ms = max(0.0, self._graph_ms(_stream_graph) - self._call_ms())
            self._keep(STREAM_KEY, chain_ms / (STREAM_LAYERS * STREAM_WIDTH ** 2 * WEIGHT_BYTES))
        return self.entries[STREAM_KEY]

    def _call_ms(self) -> float:
        """What calling a one-layer ORT graph costs beyond its layer (0 on PyTorch), timed once per table.

        Inside a model, ORT calls the next kernel directly; a timed one-layer graph also pays the session call
        (binding, executor start), about as much as a small layer at batch 1. A PyTorch layer inside a model is
        called like the timed one (a Python module call), so it keeps that cost.
        """
        if self.backend != ONNXRUNTIME_CPU:
            return 0.0
        if CALL_KEY not in self.entries:
            self._keep(CALL_KEY, self._graph_ms(lambda folder, _rng: _trivial_graph(folder)))
        return self.entries[CALL_KEY]

    def _graph_ms(self, build: Callable[[Path, np.random.Generator], Path]) -> float:
        """Median milliseconds of one whole ORT graph (written by `build` into a scratch folder), counted as timed."""
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="compress-costs-") as tmp:
            call = _bound_call(export.ort_session(build(Path(tmp), self._rng), threads=self.threads), self.batch,
                               self._rng)
            series = interleaved_rounds([call], runs=self.runs, warmup=self.warmup)
        self.timed += 1
        self.seconds_timing += time.perf_counter() - start
        return 1e3 * statistics.median(series[0])

    def _keep(self, key: str, value: float) -> None:
        """Store a probe's result in the table and write the table out."""
        self.entries[key] = value
        self.save()

    def _ensure(self, dense: LayerSite, variants: Sequence[LayerSite]) -> None:
        """Time whichever of `variants` are not cached, interleaved with `dense`; count the cached ones as hits."""
        missing = list({v.shape_key: v for v in variants if v.shape_key not in self.entries}.values())
        self.hits += len({v.shape_key for v in variants}) - len(missing)
        if missing:
            self._time(dense, missing)

    def _time(self, dense: LayerSite, variants: Sequence[LayerSite]) -> None:
        """Time `dense` (unless cached), then each variant in rounds shared with `dense` alone.

        A variant is priced as the dense layer's time times the median of the per-round ratios. Pairs, not one
        round over all variants: between two calls of a layer, a dozen others would flush the caches that its
        input and weights sit in inside a model, where it runs right after the layer that wrote its input.
        """
        variants = [v for v in variants if v.shape_key != dense.shape_key]
        start = time.perf_counter()
        with self._caller() as (call_of, synchronize):
            dense_call = call_of(dense)
            if dense.shape_key not in self.entries:
                base = interleaved_rounds([dense_call], runs=self.runs, warmup=self.warmup, synchronize=synchronize)
                self.entries[dense.shape_key] = 1e3 * statistics.median(base[0])
                self.timed += 1
            dense_ms = self.entries[dense.shape_key]
            for variant in variants:
                base, times = interleaved_rounds([dense_call, call_of(variant)], runs=self.runs, warmup=self.warmup,
                                                 synchronize=synchronize)
                self.entries[variant.shape_key] = dense_ms * statistics.median(t / b for t, b in zip(times, base))
                self.timed += 1
        self.seconds_timing += time.perf_counter() - start
        self.save()

    @contextmanager
    def _caller(self) -> Iterator[tuple[Callable[[LayerSite], Callable[[], object]], Callable[[], None]]]:
        """A factory of zero-argument calls running a site once on this backend, and the synchronisation."""
        if self.backend == ONNXRUNTIME_CPU:
            with tempfile.TemporaryDirectory(prefix="compress-costs-") as tmp:
                yield (lambda site: self._ort_call(site, Path(tmp))), lambda: None
            return
        device = torch.device("cuda" if self.backend == PYTORCH_CUDA else "cpu")
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        with torch_threads(self.threads), torch.inference_mode():
            yield (lambda site: self._torch_call(site, device)), sync

    def _ort_call(self, site: LayerSite, workdir: Path) -> Callable[[], object]:
        """A call running the site's one-layer graph, as it runs inside a model, in an ORT session (IO-bound)."""
        import onnx

        index = len(list(workdir.glob("*.plain.onnx")))
        plain = workdir / f"{index}.plain.onnx"
        onnx.save(_onnx_graph(site, self._rng), str(plain))
        chained = _in_chain(plain, workdir / f"{index}.chain.onnx", site, nchwc_block())
        return _bound_call(export.ort_session(chained, threads=self.threads), self.batch, self._rng)

    def _torch_call(self, site: LayerSite, device: torch.device) -> Callable[[], object]:
        """A call running the site as an nn.Module in eval mode on `device`."""
        layer = _torch_layer(site).eval().to(device)
        x = torch.from_numpy(_random((self.batch, *site.input_shape), self._rng)).to(device)
        return lambda: layer(x)


# ------------------------------------------------------------------------------------------------- whole models


def layers_ms(model: nn.Module, example: torch.Tensor, costs: CostModel) -> dict[str, float]:
    """The price of each Conv2d/Linear leaf of `model` at its real input shape, by name."""
    sites = sites_of(model, example)
    return dict(zip(sites, costs.sites_ms(list(sites.values()))))


def predict_ms(model: nn.Module, example: torch.Tensor, costs: CostModel, rest_ms: float,
               reference: nn.Module | None = None) -> float:
    """A whole model's predicted latency in milliseconds on the cost model's backend, batch and threads.

    `rest_ms` (the time outside the Conv2d/Linear layers, see `rest_ms`, measured on the original model) plus the
    sum of the prices of all the model's Conv2d/Linear leaves (and grouped linear layers) at their real shapes.
    With `reference` (the model `rest_ms` was measured on), the rest is scaled by the ratio of the activations the
    two models hand between layers (`activations`): the adds, pools and layout conversions outside the layers run
    over those tensors, so removing channels shrinks them, while a low-rank pair leaves them as they were.
    """
    rest = rest_ms
    if reference is not None:
        rest *= activations(model, example) / max(activations(reference, example), 1)
    return rest + sum(layers_ms(model, example, costs).values())


def activations(model: nn.Module, example: torch.Tensor) -> int:
    """Elements per item that the model's Conv2d/Linear leaves hand on (a low-rank encoder's output, consumed at
    once by its decoder, is not handed on)."""
    return sum(math.prod(site.output_shape) for name, site in sites_of(model, example).items()
               if not name.endswith(".encoder"))


def rest_ms(model: nn.Module, example: torch.Tensor, costs: CostModel, measured_ms: float) -> float:
    """The part of a model's measured latency outside its Conv2d/Linear layers: measured - their prices, >= 0."""
    return max(0.0, measured_ms - sum(layers_ms(model, example, costs).values()))


def measure_model_ms(model: nn.Module, example: torch.Tensor, costs: CostModel, *,
                     runs: int | None = None) -> float:
    """A whole model's median latency in milliseconds on the cost model's backend, batch and threads.

    The model runs on `example[:1]` repeated to the batch size, with the same timing code and warm-up as the
    table and `runs` rounds (default: the table's); on ONNX Runtime it is exported with `export.export_onnx` (to
    a temporary file) and run like `compress measure` runs it (`session.run` on a NumPy input).
    """
    runs = runs or costs.runs
    x = example[:1].detach().cpu().float().expand(costs.batch, *example.shape[1:]).contiguous()
    if costs.backend == ONNXRUNTIME_CPU:
        with tempfile.TemporaryDirectory(prefix="compress-costs-") as tmp:
            path = export.export_onnx(model, x, Path(tmp) / "model.onnx")
            session = export.ort_session(path, threads=costs.threads)
            feed = {session.get_inputs()[0].name: x.numpy()}
            series = interleaved_rounds([lambda: session.run(None, feed)], runs=runs, warmup=costs.warmup)
        return 1e3 * statistics.median(series[0])
    device = torch.device("cuda" if costs.backend == PYTORCH_CUDA else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training, before = model.training, next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval().to(device)
    x = x.to(device)
    try:
        with torch_threads(costs.threads), torch.inference_mode():
            series = interleaved_rounds([lambda: model(x)], runs=runs, warmup=costs.warmup, synchronize=sync)
    finally:
        model.to(before).train(was_training)
    return 1e3 * statistics.median(series[0])
