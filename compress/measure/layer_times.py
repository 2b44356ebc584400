"""Where a model's time goes: per-layer latency on each backend `compress measure` times, beside each layer's MACs.

Every row is a module of the PyTorch model (its dotted path, e.g. `blocks.0.conv1`) with the median time it took
over the profiled runs, its share of the run and its share of the model's MACs.

- **ONNX Runtime** (`onnxruntime-cpu`, `mobile-proxy`): ONNX Runtime's own profiler (`SessionOptions.
  enable_profiling`), one `Node` event per kernel. The TorchScript exporter names each ONNX node after the module
  it came from (`/blocks/blocks.0/conv1/Conv`); ONNX Runtime names a node it fused or inserted after a tensor of the
  exported graph (`/blocks/blocks.0/Relu_output_0_nchwc`: a Conv fused with the ReLU after it) and a Q/DQ node
  after the tensor it quantises. Each event is traced back through the exported graph to the layer it belongs to:
  a fused activation, a BatchNorm or a Q/DQ node counts with the Conv, Gemm or MatMul that feeds it (a weight's or
  the input's Q/DQ with the layer that reads it). A node that names nothing in the graph (a layout reorder ONNX
  Runtime inserted at the output) keeps its own name, marked `(runtime)`. The profiler adds a few microseconds
  per node, inside and around its event: on a graph of many small nodes at batch 1 (the int8 proxy's Q/DQ pairs)
  a profiled run takes up to twice the latency table's time (rescnn's proxy: about 1.0 ms against 0.52 ms).
- **PyTorch** (`pytorch-cpu`, `pytorch-cuda`): forward pre- and post-hooks on every module (plain `nn.Sequential`
  containers excepted: they only call their children) read `time.perf_counter`; a module's time is exclusive, its
  own span minus its children's, so the functional ops of a block's `forward` (a residual add, `torch.relu`) count
  for the block and nothing is counted twice. On CUDA each hook synchronises the device, which serialises the
  kernels. The hooks cost a few microseconds per module call (about 5 us with the bookkeeping, on a 2-core
  x86 VM: rescnn's 27 modules add about 0.15 ms to its 1.1 ms at batch 1); that cost lands in the parent's
  exclusive time, so a model of many tiny modules shows its containers slower than they are.

Shares, not absolute times, are the result: the renderers show each table's profiled total beside the latency
table's unprofiled p50. A model and its baseline are profiled interleaved run by run, as their latency is timed,
so that a layer's time beside the baseline's time of the same module shares the machine's state. The whole-model
time (`total_ms`) is the median of the profiled runs (ONNX Runtime's `model_run` event; PyTorch: `perf_counter`
around the call). What no layer accounts for in a run (ONNX Runtime's executor and allocations, Python's call
overhead around the model) is its own `unattributed` row, a median like every other row, so that the rows add up
to the total within the noise of taking medians separately. Time shares are of the sum of all rows (layers,
everything else and unattributed), so they add up to exactly 1. MACs per module come from torch's
`FlopCounterMode` with the module-level attribution it already records (exclusive: a module's own MACs, not its
children's), with the attention formula of `compress.measure.flops`; MACs that no timed row names (a layer the
runtime fused into another, a functional op at the top level) count as unattributed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress import export
from compress.measure.backends import (
    MOBILE_PROXY,
    ONNXRUNTIME_CPU,
    PYTORCH_CPU,
    PYTORCH_CUDA,
    LatencySettings,
    batch_of,
    mobile_proxy_model,
)
from compress.measure.flops import ATTENTION_FORMULAS
from compress.measure.latency import interleaved_rounds, torch_threads

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

TOP = 10  # layers shown by name; the rest are summed into one "everything else" row
MAX_RUNS = 10  # profiled runs per model, backend and batch (fewer when the latency settings ask for fewer)
TOP_LEVEL = "(top level)"  # the row of the model's own forward, outside any child module
CANDIDATE, BASELINE = "candidate", "baseline"
ORT_PROFILER, FORWARD_HOOKS = "onnxruntime-profiler", "forward-hooks"

# ONNX ops that a runtime fuses into the layer feeding them (or, for Q/DQ, that quantise that layer's tensors)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
FUSABLE_OPS = QDQ_OPS | {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                         "BatchNormalization", "Identity", "Cast"}
RESIDUAL_OPS = frozenset({"Add", "Sum"})  # fused into a Conv's kernel as its Sum input by ONNX Runtime
MAX_WALK = 16  # steps through fused nodes before giving up on a name
KERNEL_SUFFIX = "_kernel_time"
RUNTIME_SUFFIX = " (runtime)"  # marks a row of a node that ONNX Runtime added, which names nothing in the graph


@dataclass(frozen=True)
class LayerTime:
    """One layer's median time over the profiled runs and its own MACs per item."""

    name: str  # module path, TOP_LEVEL, a graph node's name outside any module, or `<node> (runtime)`
    op: str  # the ONNX op type(s) or the module's class
    ms: float
    macs: int


@dataclass(frozen=True)
class LayerProfile:
    """Every layer of one model on one backend and batch, slowest first, with the run's total and remainder."""

    backend: str
    batch: int
    threads: int
    runs: int
    method: str  # ORT_PROFILER or FORWARD_HOOKS
    total_ms: float  # median whole-model time of the profiled runs
    unattributed_ms: float  # median per-run time that no layer accounts for (>= 0)
    macs: int  # the model's MACs per item
    layers: tuple[LayerTime, ...]

    @property
    def rows_ms(self) -> float:
        """The sum of all rows: every layer's median and the unattributed median (the shares' denominator)."""
        return sum(layer.ms for layer in self.layers) + self.unattributed_ms


@dataclass(frozen=True)
class LayerRow:
    """A row of the table: a layer, or several summed ("everything else"), with its shares."""

    name: str
    op: str
    ms: float
    time_share: float
    macs_share: float
    layers: int = 1
    baseline_ms: float | None = None  # the same module's time in the baseline, when it has one

    def to_dict(self) -> dict[str, Any]:
        row = {"name": self.name, "op": self.op, "ms": round(self.ms, 5), "time_share": round(self.time_share, 5),
               "macs_share": round(self.macs_share, 5)}
        if self.baseline_ms is not None:
            row["baseline_ms"] = round(self.baseline_ms, 5)
        return row


@dataclass(frozen=True)
class LayerTable:
    """The top layers of one model on one backend and batch, everything else summed, and the remainder."""

    backend: str
    batch: int
    threads: int
    runs: int
    model: str  # CANDIDATE or BASELINE
    method: str
    total_ms: float
    layer_count: int
    layers: tuple[LayerRow, ...]
    other: LayerRow
    unattributed: LayerRow
    proxy: bool = False

    def to_dict(self) -> dict[str, Any]:
        other, rest = self.other, self.unattributed
        return {"backend": self.backend, "batch": self.batch, "threads": self.threads, "runs": self.runs,
                "model": self.model, "method": self.method, "proxy": self.proxy,
                "total_ms": round(self.total_ms, 5), "layer_count": self.layer_count,
                "layers": [row.to_dict() for row in self.layers],
                "other": {"layers": other.layers, "ms": round(other.ms, 5), "time_share": round(other.time_share, 5),
                          "macs_share": round(other.macs_share, 5)},
                "unattributed": {"ms": round(rest.ms, 5), "time_share": round(rest.time_share, 5),
                                 "macs_share": round(rest.macs_share, 5)}}


# ---------------------------------------------------------------------------------------------------------------
# MACs per module


@torch.no_grad()
def module_macs(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], int]:
    """Each module's own MACs for one item (its children's excluded; the root under TOP_LEVEL) and the total.

    torch's FlopCounterMode records FLOPs per module, each module's including its children's; a module's own share
    is its count minus its direct children's.
    """
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # as in flops.count_macs: the fused kernel hides its matmuls
    try:
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS) as counter:
            model.eval()(example[:1])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    inclusive = {_path_in(name, root): sum(ops.values()) // 2 for name, ops in counts.items() if name != "Global"}
    inclusive.pop(None, None)
    own = {name: macs - sum(m for child, m in inclusive.items() if _parent(child) == name)
           for name, macs in inclusive.items()}
    total = sum(counts.get("Global", {}).values()) // 2
    return {(name or TOP_LEVEL): max(macs, 0) for name, macs in own.items()}, total


def _path_in(counter_name: str, root: str) -> str | None:
    """A FlopCounterMode module name (`ResCNN.blocks.0`) as a module path (`blocks.0`; the root: "")."""
    if counter_name == root:
        return ""
    return counter_name[len(root) + 1:] if counter_name.startswith(root + ".") else None


def _parent(path: str) -> str | None:
    """The dotted path of a module's parent ("" for a child of the root; None for the root)."""
    if not path:
        return None
    return path.rsplit(".", 1)[0] if "." in path else ""


# ---------------------------------------------------------------------------------------------------------------
# Samples: per-run times of every row, summarised into a LayerProfile


@dataclass
class _Samples:
    """Per-run seconds of each row, per-run totals, and each row's op."""

    runs: list[dict[str, float]] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    ops: dict[str, list[str]] = field(default_factory=dict)

    def add_op(self, name: str, op: str) -> None:
        """Record that row `name` ran an `op` (each op once, in first-seen order)."""
        ops = self.ops.setdefault(name, [])
        if op not in ops:
            ops.append(op)


def summarise(samples: _Samples, macs: dict[str, int], total_macs: int, *, backend: str, batch: int, threads: int,
              method: str) -> LayerProfile:
    """Medians over the runs: each row's time, the whole run's, and the per-run remainder no row accounts for."""
    names = list(dict.fromkeys(name for run in samples.runs for name in run))
    medians = {name: 1e3 * statistics.median(run.get(name, 0.0) for run in samples.runs) for name in names}
    # clamped: ONNX Runtime rounds each event to whole microseconds, so a run's nodes can sum a hair past its total
    rest = [max(total - sum(run.values()), 0.0) for run, total in zip(samples.runs, samples.totals)]
    layers = sorted((LayerTime(name, "+".join(samples.ops.get(name, ["?"])), ms, macs.get(name, 0))
                     for name, ms in medians.items()), key=lambda layer: (-layer.ms, layer.name))
    return LayerProfile(backend=backend, batch=batch, threads=threads, runs=len(samples.runs), method=method,
                        total_ms=1e3 * statistics.median(samples.totals), unattributed_ms=1e3 * statistics.median(rest),
                        macs=total_macs, layers=tuple(layers))


def layer_table(profile: LayerProfile, *, model: str = CANDIDATE, top: int = TOP,
                baseline: LayerProfile | None = None) -> LayerTable:
    """The `top` slowest layers of `profile`, the rest summed, and the remainder, each with its time and MACs share.

    With `baseline` (the same backend and batch, another model), each named layer also carries the baseline's time
    for the module of the same name, where it has one.
    """
    denominator = profile.rows_ms or 1.0
    macs = profile.macs or 1
    before = {layer.name: layer.ms for layer in baseline.layers} if baseline is not None else {}
    shown, rest = profile.layers[:top], profile.layers[top:]
    rows = tuple(LayerRow(layer.name, layer.op, layer.ms, layer.ms / denominator, layer.macs / macs,
                          baseline_ms=before.get(layer.name)) for layer in shown)
    rest_ms = sum(layer.ms for layer in rest)
    other = LayerRow("everything else", "", rest_ms, rest_ms / denominator, sum(layer.macs for layer in rest) / macs,
                     layers=len(rest))
    timed_macs = sum(layer.macs for layer in profile.layers)
    unattributed = LayerRow("unattributed", "", profile.unattributed_ms, profile.unattributed_ms / denominator,
                            max(profile.macs - timed_macs, 0) / macs, layers=0)
    return LayerTable(backend=profile.backend, batch=profile.batch, threads=profile.threads, runs=profile.runs,
                      model=model, method=profile.method, total_ms=profile.total_ms, layer_count=len(profile.layers),
                      layers=rows, other=other, unattributed=unattributed, proxy=profile.backend == MOBILE_PROXY)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch: forward hooks


def _hooked(module: nn.Module) -> bool:
    """Whether a module gets timing hooks: all but plain Sequential containers, whose forward only calls children."""
    return type(module) is not nn.Sequential


@contextmanager
def _module_timer(model: nn.Module, sink: dict[str, float], sync: Callable[[], None]) -> Iterator[None]:
    """Hooks that add each module call's exclusive seconds (own span minus its hooked children's) into `sink`."""
    stack: list[list[float]] = []  # per open call: [start, seconds spent in hooked children]

    def before(_module: nn.Module, _args: object) -> None:
        sync()
        stack.append([time.perf_counter(), 0.0])

    def after(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, _out: object) -> None:
            sync()
            start, children = stack.pop()
            spent = time.perf_counter() - start
            sink[name] = sink.get(name, 0.0) + spent - children
            if stack:
                stack[-1][1] += spent
        return hook

    handles = []
    for name, module in model.named_modules():
        if _hooked(module):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after(name or TOP_LEVEL), always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def pytorch_samples(models: Sequence[nn.Module], x: torch.Tensor, *, device: torch.device, threads: int, runs: int,
                    warmup: int) -> list[_Samples]:
    """Per-run exclusive seconds of every module of each model on `x`, the models interleaved run by run (eval,
    inference mode; CUDA synchronised). The models are left on `device`."""
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples = [_Samples() for _ in models]
    sinks: list[dict[str, float]] = [{} for _ in models]
    done = [0 for _ in models]

    def call(index: int) -> Callable[[], None]:
        model, sink, sample = models[index], sinks[index], samples[index]

        def run() -> None:
            sink.clear()
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            total = time.perf_counter() - start
            done[index] += 1
            if done[index] > warmup:
                sample.runs.append(dict(sink))
                sample.totals.append(total)
        return run

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(threads))
        stack.enter_context(torch.inference_mode())
        for model, sink in zip(models, sinks):
            stack.enter_context(_module_timer(model.eval().to(device), sink, sync))
        interleaved_rounds([call(i) for i in range(len(models))], runs=runs, warmup=warmup)
    for model, sink, sample in zip(models, sinks, samples):
        ops = {name or TOP_LEVEL: type(module).__name__ for name, module in model.named_modules()}
        for name in sink:
            sample.add_op(name, ops[name])
    return samples


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime: the profiler, and node names traced back to modules


@dataclass(frozen=True)
class _Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class OnnxNames:
    """The exported graph's nodes and tensors, to trace a profiled node's name back to the layer it belongs to."""

    nodes: dict[str, _Node]
    producer: dict[str, str]  # tensor -> the node writing it
    consumers: dict[str, tuple[str, ...]]  # tensor -> the nodes reading it

    @classmethod
    def load(cls, path: Path) -> OnnxNames:
        """The names of an ONNX file's graph (weights not loaded)."""
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        nodes = {n.name: _Node(n.op_type, tuple(n.input), tuple(n.output)) for n in graph.node if n.name}
        producer = {t: name for name, n in nodes.items() for t in n.outputs if t}
        consumers: dict[str, list[str]] = {}
        for name, n in nodes.items():
            for t in n.inputs:
                consumers.setdefault(t, []).append(name)
        return cls(nodes, producer, {t: tuple(c) for t, c in consumers.items()})

    def known(self, text: str) -> bool:
        return text in self.nodes or text in self.producer or text in self.consumers


def _known_prefix(base: str, names: OnnxNames) -> str | None:
    """The longest prefix of `base`, ending at a `_` or `/` (or at its end), that names a node or tensor."""
    for end in range(len(base), 0, -1):
        if (end == len(base) or base[end] in "_/") and names.known(base[:end]):
            return base[:end]
    return None


def _walks(node: _Node, op: str) -> bool:
    """Whether `node` stands for a layer elsewhere: a Q/DQ node, or a fused op other than the profiled one."""
    if node.op in QDQ_OPS:
        return True
    if node.op == op:
        return False
    return node.op in FUSABLE_OPS or (node.op in RESIDUAL_OPS and op not in QDQ_OPS)


def _owner(name: str, op: str, names: OnnxNames) -> str:
    """The graph node a profiled node (named after `name`, a node or tensor) counts with."""
    if name in names.nodes:
        node = name
    else:
        node = names.producer.get(name) or (names.consumers.get(name) or (name,))[0]
    upward = True
    for _ in range(MAX_WALK):
        current = names.nodes.get(node)
        if current is None or not _walks(current, op):
            break
        source = next((names.producer[t] for t in current.inputs if t in names.producer), None) if upward else None
        if source is None:  # a weight's or the input's Q/DQ: the layer that reads it
            upward = False
            source = next((c for t in current.outputs for c in names.consumers.get(t, ())), None)
        if source is None:
            break
        node = source
    return node


def _module_path(node: str, modules: Collection[str] | None) -> str | None:
    """The module a TorchScript-exported node was traced in (`/blocks/blocks.0/conv1/Conv` -> `blocks.0.conv1`).

    Scope segments of Sequential children repeat their parent (`blocks`, `blocks.0`). None when the name carries
    no scope; with `modules`, the deepest module of the model on that path.
    """
    if not node.startswith("/"):
        return None
    parts: list[str] = []
    previous = None
    for segment in node.split("/")[1:-1]:
        if previous is not None and segment.startswith(previous + ".") and parts:
            parts[-1] = segment  # `blocks.0` under `blocks` is the module blocks.0, not blocks.blocks.0
        else:
            parts.append(segment)
        previous = segment
    path = ".".join(parts)
    if modules is not None:
        while path and path not in modules:
            path = _parent(path) or ""
    return path


def _resolver(names: OnnxNames | None, modules: Collection[str] | None) -> Callable[[str, str], tuple[str, str]]:
    """A memoised map from a profiled node (name, op) to its row (module path or node name) and the layer's op."""
    cache: dict[tuple[str, str], tuple[str, str]] = {}

    def resolve(event: str, op: str) -> tuple[str, str]:
        key = (event, op)
        if key not in cache:
            base = event.removesuffix(KERNEL_SUFFIX)
            match = _known_prefix(base, names) if names is not None else None
            if match is None and names is not None:  # a node the runtime added (e.g. a layout reorder)
                cache[key] = (f"{base}{RUNTIME_SUFFIX}", op)
                return cache[key]
            node = _owner(match, op, names) if match is not None else base
            layer_op = names.nodes[node].op if names is not None and node in names.nodes else op
            path = _module_path(node, modules)
            cache[key] = (node if path is None else (path or TOP_LEVEL), layer_op)
        return cache[key]

    return resolve


def _profiling_session(path: Path, *, threads: int, prefix: Path) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session set up as `export.ort_session` sets up the timed one, with its profiler on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _trace_runs(trace: list[dict[str, Any]], runs: int) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """The last `runs` `model_run` events and, for each, the node kernel events inside it."""
    model_runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[-runs:]
    kernels = sorted((e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith(KERNEL_SUFFIX)),
                     key=lambda e: e["ts"])
    inside = [[k for k in kernels if run["ts"] <= k["ts"] <= run["ts"] + run["dur"]] for run in model_runs]
    return model_runs, inside


@dataclass(frozen=True)
class OrtModel:
    """An ONNX or ORT file to profile, and what traces its nodes back to the PyTorch model's modules: `names`, the
    exported graph the file came from (fused and inserted nodes), and `modules`, the model's module paths."""

    path: Path
    names: OnnxNames | None = None
    modules: Collection[str] | None = None


def onnxruntime_samples(models: Sequence[OrtModel], x: np.ndarray, *, threads: int, runs: int, warmup: int,
                        workdir: Path) -> list[_Samples]:
    """Per-run seconds of each layer of each file on `x` from ONNX Runtime's profiler, the files interleaved run by
    run. The profiles are written under `workdir` and deleted once read."""
    workdir.mkdir(parents=True, exist_ok=True)
    sessions = [_profiling_session(m.path, threads=threads, prefix=workdir / f"ort-profile-{i}")
                for i, m in enumerate(models)]
    feeds = [{session.get_inputs()[0].name: x} for session in sessions]
    interleaved_rounds([functools.partial(session.run, None, feed) for session, feed in zip(sessions, feeds)],
            runs=runs, warmup=warmup)
    return [_samples_of(_read_trace(session), runs, _resolver(m.names, m.modules))
            for session, m in zip(sessions, models)]


def _read_trace(session: onnxruntime.InferenceSession) -> list[dict[str, Any]]:
    """End the session's profiling and read its JSON trace, deleting the file."""
    trace_file = Path(session.end_profiling())
    try:
        return json.loads(trace_file.read_text(encoding="utf-8"))
    finally:
        trace_file.unlink(missing_ok=True)


def _samples_of(trace: list[dict[str, Any]], runs: int, resolve: Callable[[str, str], tuple[str, str]]) -> _Samples:
    """The last `runs` runs of a trace: each row's seconds (its node events summed) and the run's total."""
    samples = _Samples()
    for run, kernels in zip(*_trace_runs(trace, runs)):
        seconds: dict[str, float] = {}
        for kernel in kernels:
            row, op = resolve(kernel["name"], kernel.get("args", {}).get("op_name", "?"))
            seconds[row] = seconds.get(row, 0.0) + 1e-6 * kernel["dur"]
            samples.add_op(row, op)
        samples.runs.append(seconds)
        samples.totals.append(1e-6 * run["dur"])
    return samples


def _source_onnx(ort_file: Path) -> Path | None:
    """The ONNX file an ORT-format file was converted from (`d/ort/m.ort` from `d/m.onnx`), if it is there."""
    source = ort_file.parent.parent / f"{ort_file.stem}.onnx"
    return source if source.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Every backend and batch


# The files measure_backends writes under its workdir, by the same names, are the ones profiled when they are there:
# the very files the latency table timed, and the int8 calibration of the mobile proxy is not paid twice.


def _onnx_file(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """The model's ONNX file (dynamic batch) at `path`: the one already there, else exported now."""
    return path if path.is_file() else export.export_onnx(model, x, path)


def _mobile_file(model: nn.Module, x: torch.Tensor, calibration: torch.Tensor, folder: Path) -> Path:
    """The mobile proxy's ORT file built in `folder`: the one already there, else built now."""
    built = sorted(folder.glob("ort/*.ort"))
    return built[0] if built else mobile_proxy_model(model, x, calibration, folder)


def _ort_model(model: nn.Module, role: str, backend: str, x: torch.Tensor, calibration: torch.Tensor,
               workdir: Path) -> OrtModel:
    """The file `measure_backends` times for `model` on an ONNX Runtime backend at x's batch, and its names."""
    if backend == ONNXRUNTIME_CPU:  # one file per model, with a dynamic batch axis
        path = source = _onnx_file(model, x, workdir / f"{role}.onnx")
    else:
        path = _mobile_file(model, x, calibration, workdir / f"{role}-mobile-b{x.shape[0]}")
        source = _source_onnx(path)
    return OrtModel(path, OnnxNames.load(source) if source is not None else None,
                    {name for name, _ in model.named_modules()})


def _profiles(models: dict[str, nn.Module], backend: str, x: torch.Tensor, calibration: torch.Tensor,
              settings: LatencySettings, workdir: Path,
              macs: dict[str, tuple[dict[str, int], int]]) -> dict[str, LayerProfile]:
    """Each model's LayerProfile on one backend at x's batch size, the models interleaved."""
    runs, warmup = min(settings.runs, MAX_RUNS), max(settings.warmup, 1)
    threads = 1 if backend == MOBILE_PROXY else settings.threads
    if backend in (PYTORCH_CPU, PYTORCH_CUDA):
        device = torch.device("cuda" if backend == PYTORCH_CUDA else "cpu")
        samples = pytorch_samples(list(models.values()), x, device=device, threads=threads, runs=runs, warmup=warmup)
        for model in models.values():
            model.cpu()  # nn.Module.cpu moves the module in place
        method = FORWARD_HOOKS
    else:
        files = [_ort_model(model, role, backend, x, calibration, workdir) for role, model in models.items()]
        samples = onnxruntime_samples(files, x.numpy(), threads=threads, runs=runs, warmup=warmup,
                                      workdir=workdir / "profiles")
        method = ORT_PROFILER
    return {role: summarise(sample, *macs[role], backend=backend, batch=x.shape[0], threads=threads, method=method)
            for role, sample in zip(models, samples)}


def measure_layer_times(candidate: nn.Module, baseline: nn.Module | None, inputs: torch.Tensor,
                        calibration: torch.Tensor, settings: LatencySettings, workdir: Path, *,
                        top: int = TOP) -> list[LayerTable]:
    """Per-layer latency tables of `candidate` (and `baseline`) on each backend and batch size in `settings`.

    For every backend and batch: the candidate's table (each named layer with the baseline's time of the same
    module, when there is a baseline), then the baseline's own, the two profiled interleaved run by run. Inputs,
    threads, warm-up and the files timed are those of `measure_backends` (ONNX with a dynamic batch; the mobile
    proxy's int8 ORT file per batch, on one thread); at most MAX_RUNS runs are profiled. Given the `workdir` that
    `measure_backends` wrote for the same models and inputs, the files it timed are profiled rather than built
    again; files missing there are written there.
    """
    models = {CANDIDATE: candidate.cpu().eval()}
    if baseline is not None:
        models[BASELINE] = baseline.cpu().eval()
    macs = {role: module_macs(model, inputs[:1]) for role, model in models.items()}
    tables: list[LayerTable] = []
    for backend in settings.backends:
        for batch in settings.batches:
            profiles = _profiles(models, backend, batch_of(inputs, batch), calibration, settings, workdir, macs)
            tables.append(layer_table(profiles[CANDIDATE], model=CANDIDATE, top=top,
                                      baseline=profiles.get(BASELINE)))
            if BASELINE in profiles:
                tables.append(layer_table(profiles[BASELINE], model=BASELINE, top=top))
    return tables

