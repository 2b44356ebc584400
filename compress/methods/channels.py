"""Channel units of any CNN and their physical removal (the machinery of PAGCP; METHODS.md §2, §4).

Units are Torch-Pruning dependency groups: a convolution's output channels together with everything coupled to
them (residual adds, concats, norms, depthwise convolutions, the consumers' input channels). Layers that produce
a model output (every task's head) are found from the graph and never pruned; their inputs shrink.

A probe prunes a unit in place on one working copy with one dependency graph, and puts the touched modules'
tensors and attributes back afterwards (tp replaces parameters rather than editing them, so the originals are
kept by reference). The `channels` transform records the pruned widths in arch.json so a run rebuilds
weights-only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.config import matches
from compress.errors import UsageError
from compress.measure import count_macs
from compress.models.transforms import register_transform

TRANSFORM = "channels"
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
               "num_channels", "num_parameters", "normalized_shape", "embedding_dim")

# ----------------------------------------------------------------------------------------------------- units


@dataclass
class Unit:
    """A prunable set of coupled output channels, rooted at one Conv/Linear."""

    index: int                   # discovery order
    name: str                    # root module name
    kind: str
    channels: int
    members: list[str]           # modules whose output channels go (conv, linear, norms)
    consumers: list[str]         # modules whose input channels go
    chunks: int = 1              # grouped convolutions: channels removed at the same positions in each chunk
    contribution: int = 0        # MACs removed by the probe (probe_ratio of the channels)
    probe_removed: int = 0


@dataclass
class Graph:
    """A model, its dependency graph, and the units and what was left alone."""

    model: nn.Module
    dg: Any
    units: list[Unit]
    heads: list[str]
    ignored: list[str]
    skipped: list[dict[str, str]]
    modules: dict[str, nn.Module] = field(default_factory=dict)
    unmapped: set[Any] = field(default_factory=set)  # reshape nodes whose channel count Torch-Pruning lost


def _tp():
    import torch_pruning as tp

    return tp


@contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """The names of the modules running now (innermost last), for naming the module that broke a trace."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(names[module])

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack:
            stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    return []


def build_graph(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = ()) -> Graph:
    """Trace `model` with Torch-Pruning and list its units; heads, ignored and unprunable groups are left alone
    (among them every group whose channels pass through a reshape that reorders them, such as ShuffleNet's
    channel shuffle, which Torch-Pruning cannot follow)."""
    tp = _tp()
    dg, captured, unmapped = _trace(model, example)
    names = {m: n for n, m in model.named_modules()}
    user_ignored = {m for n, m in model.named_modules() if n and any(matches(n, p) for p in ignore)}
    scan = _Scan(dg, names, _output_nodes(dg, captured), user_ignored, tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR,
                 tp.ops.OPTYPE.OUTPUT)
    graph = Graph(model, dg, [], [], [], [], dict(model.named_modules()), unmapped)
    for group in _groups(dg, graph, names, (scan.conv, scan.linear)):
        scan.add(graph, group)
    return graph


def _groups(dg: Any, graph: Graph, names: dict[nn.Module, str], root_types: tuple[type, ...]) -> Iterator[Any]:
    """Torch-Pruning's groups, one per root (as `get_all_groups`), except those whose channels cannot be mapped:
    a group Torch-Pruning fails to build, or one passing through a reshape that reorders channels (a channel
    shuffle) or whose channel count it could not infer, goes to `graph.skipped` with the reason."""
    visited: set[nn.Module] = set()
    shuffles = any(_splits_channels(node) for node in dg.module2node.values())
    for module in list(dg.module2node):
        if not isinstance(module, root_types) or module in visited or module in dg.IGNORED_LAYERS_IN_TRACING:
            continue
        pruner = dg.get_pruner_of_module(module)
        channels = None if pruner is None else pruner.get_out_channels(module)
        if channels is None:
            continue
        name = names.get(module, "?")
        try:
            group = _pruning_group(dg, graph.unmapped, module, pruner.prune_out_channels, list(range(channels)))
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's index mappings raise anything on odd graphs
            first = (str(exc).splitlines() or [""])[0][:120]
            reason = f"Torch-Pruning cannot map its channels through the graph ({type(exc).__name__}: {first})"
            if shuffles:
                reason += "; the model splits channels in a view (a channel shuffle), which it does not follow"
            graph.skipped.append({"name": name, "reason": reason})
            visited.add(module)
            continue
        members = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)
                   and isinstance(dep.target.module, nn.Module)]
        visited.update(members)
        reason = _unmappable(group, graph.unmapped)
        if reason:  # every layer of the group is left alone: each is named
            graph.skipped.append({"name": name, "reason": reason})
            graph.skipped += [{"name": names[m], "reason": f"coupled to {name!r}, whose {reason.removeprefix('its ')}"}
                              for m in dict.fromkeys(members) if m is not module and isinstance(m, root_types)
                              and m in names]
            continue
        yield group


def _shape(value: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return None


def _reshape_shapes(grad_fn: Any) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """The input and output shapes of a view/reshape's autograd node (None where PyTorch does not keep them)."""
    before = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if before is None:
        before = getattr(grad_fn, "_saved_self_sizes", None)
    metadata = getattr(grad_fn, "_input_metadata", None)
    after = metadata[0].shape if metadata else None
    return (_shape(before) if before is not None else None), (_shape(after) if after is not None else None)


def _splits_dim1(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether `b` is `a` with its dimension 1 (the channels of N, C, ... layouts) split in two parts, both > 1."""
    return (len(a) >= 3 and len(b) == len(a) + 1 and a[0] == b[0] and b[3:] == a[2:]
            and b[1] * b[2] == a[1] and b[1] > 1 and b[2] > 1)


def _splits_channels(node: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The shapes of a reshape node that splits dimension 1 in two (or merges it back), else None."""
    if node.type != _tp().ops.OPTYPE.RESHAPE:
        return None
    before, after = _reshape_shapes(node.grad_fn)
    if before and after and (_splits_dim1(before, after) or _splits_dim1(after, before)):
        return before, after
    return None


def _unmappable(group: Any, unmapped: set[Any]) -> str | None:
    """Why Torch-Pruning's index mapping of `group` cannot be trusted, or None."""
    for dep, _ in group:
        node = dep.target
        if node in unmapped:
            return "Torch-Pruning could not infer the channel count at a reshape on its path"
        if shapes := _splits_channels(node):
            return (f"its channels pass through a view that splits them in two dimensions ({list(shapes[0])} -> "
                    f"{list(shapes[1])}: a channel shuffle or grouped reshape), whose channel order Torch-Pruning "
                    "does not follow")
    return None


@contextmanager
def _reshape_mapping(unmapped: set[Any]) -> Iterator[None]:
    """Torch-Pruning 1.6's reshape index mapping, made to read PyTorch 2's name for a view's input shape.

    It looks for `grad_fn._saved_self_sizes` (PyTorch 1.x), which PyTorch 2 calls `_saved_self_sym_sizes`, so
    its guard "only 1-D and 4-D inputs" never runs and every view of a CNN is treated as a flatten; on a channel
    shuffle (4-D -> 5-D -> transpose -> 4-D) its channel inference then gives 0 and it divides by it. Here a view
    of another rank is left unmapped, as Torch-Pruning intends, and a view whose channels it cannot infer is
    recorded in `unmapped` (the groups through it are skipped) instead of stopping the trace."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def update(graph: Any, node: Any) -> None:
        before, _ = _reshape_shapes(node.grad_fn)
        if before is not None and len(before) not in (1, 4):
            return
        try:
            original(graph, node)
        except ZeroDivisionError:
            unmapped.add(node)

    index_mapping.update_reshape_index_mapping = update
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def _pruning_group(dg: Any, unmapped: set[Any], module: nn.Module, fn: Callable, idxs: list[int]) -> Any:
    """`dg.get_pruning_group`, which recomputes every index mapping, with the reshape mapping fixed."""
    with _reshape_mapping(unmapped):
        return dg.get_pruning_group(module, fn, idxs)


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[Any, list[Any], set[Any]]:
    """Torch-Pruning's dependency graph of `model` in eval mode, the outputs the trace produced, and the reshape
    nodes whose index mapping failed."""
    tp = _tp()
    captured: list[Any] = []
    unmapped: set[Any] = set()
    was_training = model.training
    model.eval()
    with _module_stack(model) as stack, torch.enable_grad(), _reshape_mapping(unmapped):
        try:
            dg = tp.DependencyGraph().build_dependency(
                model, example, forward_fn=lambda m, x: m(x), verbose=False,
                output_transform=lambda out: captured.append(out) or out)
        except Exception as exc:  # noqa: BLE001 - tracing raises anything the model's forward can raise
            raise _untraceable(model, stack, exc) from None
    model.train(was_training)
    return dg, captured, unmapped


def _untraceable(model: nn.Module, stack: list[str], exc: Exception) -> UsageError:
    """The error for a model whose trace failed, naming the innermost module that was running."""
    where = stack[-1] if stack else ""
    module = model.get_submodule(where) if where else model
    label = f"module {where!r} ({type(module).__name__})" if where else f"{type(model).__name__}"
    first = (str(exc).splitlines() or [""])[0][:200]
    return UsageError(f"Torch-Pruning cannot trace {label}: {type(exc).__name__}: {first}; make its forward "
                      "traceable with autograd (tensor outputs, no torch.no_grad or in-place edits of its "
                      "input) or prune a model without it")


def _output_nodes(dg: Any, captured: list[Any]) -> set[Any]:
    """The graph nodes whose autograd functions produce a model output."""
    outputs = _flatten(captured[0]) if captured else []
    roots = {id(o.grad_fn) for o in outputs if o.grad_fn is not None}
    return {node for node in dg.module2node.values() if id(node.grad_fn) in roots}


@dataclass(frozen=True)
class _Scan:
    """What sorting the dependency groups of one traced model into units, heads, ignored and skipped needs."""

    dg: Any
    names: dict[nn.Module, str]
    output_nodes: set[Any]
    user_ignored: set[nn.Module]
    conv: type
    linear: type
    output_type: Any  # Torch-Pruning's node type of a model output

    def add(self, graph: Graph, group: Any) -> None:
        """File `group` under the graph's heads, ignored, skipped or units."""
        root = group[0].dep.target.module
        out_members = self.out_members(group)
        reaches_output = self.reaches_output(group)
        layer_names = [self.names[m] for m in out_members if isinstance(m, (self.conv, self.linear))]
        if reaches_output:
            graph.heads.extend(layer_names)
            return
        if any(m in self.user_ignored for m in out_members):
            graph.ignored.extend(layer_names)
            return
        channels = self.dg.get_pruner_of_module(root).get_out_channels(root)
        chunks = self.chunks(group)
        if channels is None or channels < 2:
            graph.skipped.append({"name": self.names.get(root, "?"), "reason": "fewer than 2 output channels"})
            return
        if channels % chunks or channels // chunks < 2 and chunks > 1:
            reason = f"channels {channels} do not split into {chunks} convolution groups that can lose a channel each"
            graph.skipped.append({"name": self.names[root], "reason": reason})
            return
        graph.units.append(Unit(len(graph.units), self.names[root], type(root).__name__, channels,
                                [self.names[m] for m in out_members], self.consumers(group), chunks))

    def out_members(self, group: Any) -> list[nn.Module]:
        """The named modules of `group` that lose output channels."""
        return [dep.target.module for dep, _ in group if self.dg.is_out_channel_pruning_fn(dep.handler)
                and isinstance(dep.target.module, nn.Module) and dep.target.module in self.names]

    def reaches_output(self, group: Any) -> bool:
        """Whether pruning `group` would change a model output's width (a head's group)."""
        return any(dep.target in self.output_nodes and (dep.target.type == self.output_type or
                                                        self.dg.is_out_channel_pruning_fn(dep.handler))
                   for dep, _ in group)

    def chunks(self, group: Any) -> int:
        """The least common multiple of the group counts of the grouped (not depthwise) convolutions in `group`."""
        chunks = 1
        for dep, _ in group:
            m = dep.target.module
            if isinstance(m, self.conv) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
                chunks = math.lcm(chunks, m.groups)
        return chunks

    def consumers(self, group: Any) -> list[str]:
        """The names of the modules of `group` that lose input channels only."""
        return [self.names[dep.target.module] for dep, _ in group if self.dg.is_in_channel_pruning_fn(dep.handler)
                and not self.dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in self.names]


def _root_group(graph: Graph, unit: Unit, idxs: list[int]) -> Any:
    root = graph.modules[unit.name]
    pruner = graph.dg.get_pruner_of_module(root)
    return _pruning_group(graph.dg, graph.unmapped, root, pruner.prune_out_channels, idxs)


def saliency(graph: Graph, unit: Unit, norm: str = "l1") -> torch.Tensor:
    """Score per output channel (root index): the sum over the unit's Conv/Linear members of the channel's mean
    |W| (l1) or root-mean-square W (l2); BatchNorm |gamma| when the unit has no such member."""
    tp = _tp()
    group = _root_group(graph, unit, list(range(unit.channels)))
    score = torch.zeros(unit.channels, dtype=torch.float64)
    fallback = torch.zeros(unit.channels, dtype=torch.float64)
    found = False
    for item in group:
        dep, idxs, root_idxs = item.dep, item.idxs, item.root_idxs
        module = dep.target.module
        if not graph.dg.is_out_channel_pruning_fn(dep.handler) or not isinstance(module, nn.Module):
            continue
        if isinstance(module, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
            weight = module.weight.detach()
            if getattr(module, "transposed", False):
                weight = weight.transpose(0, 1)
            flat = weight.flatten(1).double()
            per = flat.abs().mean(1) if norm == "l1" else flat.pow(2).mean(1).sqrt()
            score.index_add_(0, torch.tensor(root_idxs), per[torch.tensor(idxs)].cpu())
            found = True
        elif isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
            fallback.index_add_(0, torch.tensor(root_idxs), module.weight.detach().abs().double()[idxs].cpu())
    return score if found else fallback


def removable(unit: Unit, ratio: float) -> int:
    """Channels a ratio removes: floor(ratio x C), the kept count rounded up to a multiple of the unit's
    convolution groups, at least one channel (one per group) kept."""
    c = unit.channels
    kept = max(c - math.floor(ratio * c + 1e-9), 1)
    kept = min(c, math.ceil(kept / unit.chunks) * unit.chunks)
    return c - kept


def grid(step: float) -> list[float]:
    """The ratio grid step, 2 step, ... up to 0.95."""
    count = math.floor(0.95 / step + 1e-9)
    return [round(step * (i + 1), 10) for i in range(count)]


def candidate_removals(unit: Unit, step: float, round_to: int = 1) -> list[int]:
    """Channels each candidate removes, ascending and distinct: the ratio grid's, or with round_to r > 1 every
    kept width that is a multiple of r (and of the unit's groups) below the unit's width; a unit narrower than
    2r has none (it is left alone)."""
    if round_to > 1:
        if unit.channels < 2 * round_to:
            return []
        width = math.lcm(round_to, unit.chunks)
        return [unit.channels - kept for kept in range((unit.channels - 1) // width * width, 0, -width)]
    removals: list[int] = []
    for ratio in grid(step):
        n = removable(unit, ratio)
        if n > 0 and n not in removals:
            removals.append(n)
    return removals


def select(scores: torch.Tensor, n: int, chunks: int = 1) -> list[int]:
    """The n lowest-scoring channels, ties by position; with chunks, the same n / chunks positions in each."""
    if n <= 0:
        return []
    if chunks == 1:
        return sorted(torch.argsort(scores, stable=True)[:n].tolist())
    size = len(scores) // chunks
    positions = torch.argsort(scores.view(chunks, size).sum(0), stable=True)[:n // chunks].tolist()
    return sorted(c * size + p for c in range(chunks) for p in positions)


# ----------------------------------------------------------------------------------------- in-place probes


def _snapshot(obj: Any) -> dict[str, Any]:
    state = dict(vars(obj))
    if isinstance(obj, nn.Module):
        state["_parameters"] = dict(obj._parameters)
        state["_buffers"] = dict(obj._buffers)
    for key, value in state.items():
        if isinstance(value, list) and all(isinstance(v, (int, type(None))) for v in value):
            state[key] = list(value)  # concat/split sizes, which tp edits in place
    return state


def _restore(obj: Any, state: dict[str, Any]) -> None:
    vars(obj).clear()
    vars(obj).update(state)


def prune_unit(graph: Graph, unit: Unit, idxs: list[int]) -> Callable[[], None]:
    """Remove channels `idxs` (root indices) of `unit` in place; returns the function that puts them back."""
    tp = _tp()
    group = _root_group(graph, unit, idxs)
    saved: list[tuple[Any, dict[str, Any]]] = []
    dg_maps = None
    for item in group:
        target = item.dep.target
        if target.type == tp.ops.OPTYPE.PARAMETER:
            if dg_maps is None:
                dg_maps = (dict(graph.dg.module2node), dict(graph.dg._param_to_name))
            name = graph.dg._param_to_name[target.module]
            parent = graph.model.get_submodule(name.rpartition(".")[0]) if "." in name else graph.model
            saved.append((parent, _snapshot(parent)))
            saved.append((target, _snapshot(target)))
        elif isinstance(target.module, nn.Module):  # and its children: tp edits MultiheadAttention's out_proj
            saved += [(module, _snapshot(module)) for module in target.module.modules()]
        elif not isinstance(target.module, nn.Parameter):
            saved.append((target.module, _snapshot(target.module)))
    with torch.no_grad():
        group.prune(record_history=False)

    def undo() -> None:
        for obj, state in reversed(saved):
            _restore(obj, state)
        if dg_maps is not None:
            graph.dg.module2node, graph.dg._param_to_name = dg_maps

    return undo


# ---------------------------------------------------------------------------------------- the transform


def channel_transform(model: nn.Module, before: dict[str, list[int]]) -> dict[str, Any]:
    """The arch.json edit that re-creates every module whose tensors changed shape: its shape attributes and the
    shapes of its own parameters and buffers."""
    modules: dict[str, Any] = {}
    for name, module in model.named_modules():
        tensors = {k: list(v.shape) for k, v in [*module._parameters.items(), *module._buffers.items()]
                   if v is not None}
        full = {f"{name}.{k}" if name else k: shape for k, shape in tensors.items()}
        if any(before.get(k) != shape for k, shape in full.items()):
            attrs = {a: list(v) if isinstance(v, tuple) else v for a in SHAPE_ATTRS
                     if isinstance(v := getattr(module, a, None), (int, tuple))}
            modules[name] = {"attrs": attrs, "tensors": tensors}
    return {"type": TRANSFORM, "modules": modules}


def probe_contributions(graph: Graph, example: torch.Tensor, probe_ratio: float,
                        progress: Callable[[str, int, int], None] | None = None) -> int:
    """MACs removed by cutting probe_ratio of each unit's channels (in place, then restored); returns MACs(M)."""
    total = count_macs(graph.model, example).macs
    for i, unit in enumerate(graph.units):
        n = removable(unit, probe_ratio)
        n = max(n, unit.chunks) if n == 0 and unit.channels > unit.chunks else n
        unit.probe_removed = n
        if n:
            undo = prune_unit(graph, unit, select(saliency(graph, unit), n, unit.chunks))
            try:
                unit.contribution = total - count_macs(graph.model, example).macs
            except Exception:  # noqa: BLE001 - a unit whose pruning breaks the forward pass is skipped later
                unit.contribution = -1
            finally:
                undo()
        if progress:
            progress("pagcp: probing units", i + 1, len(graph.units))
    return total


def replay(model: nn.Module, example: torch.Tensor, removals: dict[str, list[int]], ignore: tuple[str, ...]) -> None:
    """Prune `model` in place: unit name -> its output-channel indices to remove (original indices)."""
    graph = build_graph(model, example, ignore)
    by_name = {u.name: u for u in graph.units}
    for name, idxs in removals.items():
        if idxs:
            prune_unit(graph, by_name[name], idxs)


@register_transform(TRANSFORM)
def replay_channels(model: nn.Module, edit: dict[str, Any]) -> None:
    """arch.json replay: give each recorded module its pruned widths (fresh tensors; the weights load after)."""
    for name, spec in edit["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"arch.json prunes channels of {name!r}, which this architecture does not have; the "
                             "run directory does not match its base model") from None
        for attr, value in spec.get("attrs", {}).items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        for key, shape in spec["tensors"].items():
            old = module._parameters.get(key)
            if old is not None:
                module._parameters[key] = nn.Parameter(torch.zeros(shape, dtype=old.dtype),
                                                       requires_grad=old.requires_grad)
            elif module._buffers.get(key) is not None:
                module._buffers[key] = torch.zeros(shape, dtype=module._buffers[key].dtype)
