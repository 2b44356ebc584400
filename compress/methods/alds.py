"""ALDS: automatic layer-wise decomposition selector (Liebenwein et al., NeurIPS 2021), and two SVD baselines.

Each Conv2d/Linear layer W (f x c x kernel) may become a grouped encoder (k groups of input channels, rank j in
each) followed by a 1x1 decoder that carries the original bias (METHODS.md §3). The error of a layer is the
Eckart-Young-Mirsky bound eps(k, j) = max_i sigma_{j+1}(group i) / ||fold(W)||_2. One common error level eps*
is chosen so that the whole network meets its budget, which minimises the worst layer's error for the k's in
use; the k's come from a seeded search. Baselines with k = 1: `svd` (one relative rank for all layers) and
`svd-energy` (one fraction of Frobenius energy kept in every layer), under the same budget.

Spectra come from the eigenvalues of Gram matrices (M M^T or M^T M, whichever is smaller): float32 while
searching over k, float64 for the final allocation and the decomposition, where the reconstruction is the exact
projection onto the top-j singular subspace of each group.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from compress.config import ALDSConfig, SVDConfig, SVDEnergyConfig, latency_keep_of, matches, params_keep
from compress.errors import UsageError
from compress.measure import count_macs
from compress.methods import pricing
from compress.methods.base import KEEP_TOLERANCE, AuditOutcome, Context, ReportSection, Result, register
from compress.methods.oracle import Oracle
from compress.methods.pricing import Prices
from compress.models.transforms import register_transform
from compress.tasks import CLASSIFICATION

FIXED_K_SEEDS = (3, 5, 7, 9)    # the first seeds of the k search: per layer, the divisor of c nearest to these
GRAM_FINE_LIMIT = 1 << 24       # elements of the finest-level Gram stack reused for coarser k (else per k)
TRANSFORM = "lowrank"


# ------------------------------------------------------------------------------------------------- modules


class GroupedLinear(nn.Module):
    """y = concat_i(W_i x_i): the input features split into `groups` equal parts, each with its own weight.

    The weight is stored like a grouped convolution's, (out_features, in_features // groups); the forward pass
    is one broadcast matmul, which exports to ONNX as MatMul.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, *, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups {groups} must divide in_features {in_features} and out_features {out_features}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        parts = x.unflatten(-1, (g, self.in_features // g)).unsqueeze(-2)          # (..., g, 1, c/g)
        weight = self.weight.view(g, self.out_features // g, -1).transpose(1, 2)  # (g, c/g, j)
        return torch.matmul(parts, weight).flatten(-3)                            # (..., g*j)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


class LowRank(nn.Sequential):
    """A layer replaced by its decomposition: `encoder` (grouped, rank j per group) then `decoder` (1x1)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__(OrderedDict(encoder=encoder, decoder=decoder))


def build_lowrank(module: nn.Module, groups: int, rank: int) -> LowRank:
    """The two-module structure replacing `module` with k = `groups` and rank j = `rank` (fresh weights)."""
    k, j = groups, rank
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise UsageError(f"cannot decompose grouped convolution with groups={module.groups}")
        if module.in_channels % k:
            raise UsageError(f"groups {k} must divide in_channels {module.in_channels}")
        encoder = nn.Conv2d(module.in_channels, k * j, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=k, bias=False,
                            padding_mode=module.padding_mode, **factory)
        decoder = nn.Conv2d(k * j, module.out_channels, 1, bias=bias, **factory)
    elif isinstance(module, nn.Linear):
        if module.in_features % k:
            raise UsageError(f"groups {k} must divide in_features {module.in_features}")
        encoder = nn.Linear(module.in_features, j, bias=False, **factory) if k == 1 else \
            GroupedLinear(module.in_features, k * j, k, **factory)
        decoder = nn.Linear(k * j, module.out_features, bias=bias, **factory)
    else:
        raise UsageError(f"low-rank decomposition supports Conv2d and Linear, not {type(module).__name__}")
    return LowRank(encoder, decoder)


@register_transform(TRANSFORM)
def replay_lowrank(model: nn.Module, edit: dict[str, Any]) -> None:
    """arch.json replay: replace module `edit["layer"]` by its low-rank structure (random weights)."""
    name = edit["layer"]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"arch.json decomposes layer {name!r}, which this architecture does not have; the "
                         "run directory does not match its base model") from None
    model.set_submodule(name, build_lowrank(module, int(edit["groups"]), int(edit["rank"])))


# ------------------------------------------------------------------------------------------------- spectra


def fold(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(f, c, *kernel) -> (k, f, (c/k)*prod(kernel)): group i holds input channels [i c/k, (i+1) c/k)."""
    f = weight.shape[0]
    return weight.reshape(f, groups, -1).transpose(0, 1)


def _gram(blocks: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of each block, and whether it is the left one (M M^T)."""
    f, m = blocks.shape[-2:]
    if f <= m:
        return blocks @ blocks.transpose(-1, -2), True
    return blocks.transpose(-1, -2) @ blocks, False


def _descending(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) from ascending Gram eigenvalues."""
    return eigenvalues.flip(-1).clamp_min(0.0).sqrt()


def group_singular_values(weight: torch.Tensor, ks: list[int],
                          dtype: torch.dtype = torch.float32) -> dict[int, np.ndarray]:
    """Per-group singular values for each k: {k: array (k, r_k)}, descending, with r_k = min(f, c*kappa/k).

    Left Gram matrices (f x f) of the coarser k are sums of those of the finest such k, so the expensive
    products are formed once per layer rather than once per k.
    """
    w = weight.detach().to("cpu", dtype)
    f, c = w.shape[0], w.shape[1]
    cols = w[0].numel()
    out: dict[int, np.ndarray] = {}
    left = [k for k in ks if f <= cols // k]
    if len(left) > 1:
        finest = math.lcm(*left)
        if finest * f * f <= GRAM_FINE_LIMIT and c % finest == 0:
            blocks = fold(w, finest)
            fine = blocks @ blocks.transpose(-1, -2)
            for k in left:
                gram = fine.view(k, finest // k, f, f).sum(1)
                out[k] = _descending(torch.linalg.eigvalsh(gram)).double().numpy()
    for k in ks:
        if k not in out:
            gram, _ = _gram(fold(w, k))
            out[k] = _descending(torch.linalg.eigvalsh(gram)).double().numpy()
    return out


def spectral_norm(matrix: torch.Tensor) -> float:
    """||A||_2 of a float64 matrix from the largest eigenvalue of its smaller Gram matrix."""
    gram, _ = _gram(matrix)
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt())


@dataclass
class Factors:
    """A layer's exact per-group decomposition for one k (float64): sigma (k, r), and the top singular subspace."""

    k: int
    sigma: np.ndarray
    vectors: torch.Tensor     # (k, g, r) eigenvectors of the Gram matrix, descending
    left: bool                # vectors are left singular vectors (else right)
    norm: float = 0.0         # ||fold(W)||_2 with k = 1


def exact_factors(weight: torch.Tensor, k: int) -> Factors:
    """float64 per-group spectrum and singular vectors of fold(W) with k groups."""
    blocks = fold(weight.detach().to("cpu", torch.float64), k)
    gram, left = _gram(blocks)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    sigma = _descending(eigenvalues).numpy()
    if k == 1:
        norm = float(sigma[0, 0]) if sigma.size else 0.0
    else:
        norm = spectral_norm(blocks.transpose(0, 1).reshape(blocks.shape[1], -1))
    return Factors(k, sigma, vectors.flip(-1), left, norm)


def lowrank_weights(weight: torch.Tensor, factors: Factors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors D_i = U_j sqrt(S_j) (k, f, j) and E_i = sqrt(S_j) V_j^T (k, j, m), in float64.

    D_i E_i is the projection of group i onto its top-j singular subspace (its best rank-j approximation);
    directions whose singular value vanishes contribute nothing and are left at zero.
    """
    blocks = fold(weight.detach().to("cpu", torch.float64), factors.k)
    vectors = factors.vectors[..., :rank]
    sigma = torch.from_numpy(np.ascontiguousarray(factors.sigma[:, :rank]))
    floor = max(float(factors.sigma.max(initial=0.0)), 1e-300) * 1e-12
    alive = sigma > floor
    root = sigma.sqrt()
    inverse_root = torch.where(alive, 1.0 / torch.where(alive, root, torch.ones_like(root)), torch.zeros_like(root))
    if factors.left:   # vectors = U_j: D = U sqrt(S), E = S^{-1/2} U^T M
        decoder = vectors * torch.where(alive, root, torch.zeros_like(root)).unsqueeze(-2)
        encoder = inverse_root.unsqueeze(-1) * (vectors.transpose(-1, -2) @ blocks)
    else:              # vectors = V_j: D = M V S^{-1/2}, E = sqrt(S) V^T
        decoder = (blocks @ vectors) * inverse_root.unsqueeze(-2)
        encoder = torch.where(alive, root, torch.zeros_like(root)).unsqueeze(-1) * vectors.transpose(-1, -2)
    return decoder, encoder


def load_lowrank(target: LowRank, module: nn.Module, decoder: torch.Tensor, encoder: torch.Tensor) -> None:
    """Write the (k, f, j) decoder and (k, j, m) encoder factors and the original bias into `target`."""
    k, f, j = decoder.shape
    enc, dec = target.encoder, target.decoder
    with torch.no_grad():
        enc.weight.copy_(encoder.reshape(enc.weight.shape).to(enc.weight.dtype))
        dec.weight.copy_(decoder.permute(1, 0, 2).reshape(f, k * j).reshape(dec.weight.shape).to(dec.weight.dtype))
        if module.bias is not None:
            dec.bias.copy_(module.bias.detach())


def reconstructed(target: LowRank, groups: int) -> torch.Tensor:
    """The effective weight of a LowRank module, folded like the original with k = 1: (f, c*kappa), float64."""
    enc = target.encoder.weight.detach().to("cpu", torch.float64)
    dec = target.decoder.weight.detach().to("cpu", torch.float64)
    f = dec.shape[0]
    j = dec.shape[1] // groups
    d = dec.reshape(f, groups, j).transpose(0, 1)          # (k, f, j)
    e = enc.reshape(groups, j, -1)                          # (k, j, m)
    return (d @ e).transpose(0, 1).reshape(f, -1)          # (f, k*m)


# ------------------------------------------------------------------------------------------------- layers


@dataclass
class Candidate:
    """A Conv2d/Linear layer that may be decomposed."""

    name: str
    module: nn.Module
    f: int
    c: int
    kernel: int            # prod(kernel size); 1 for Linear
    positions: int = 0     # outputs per output channel for one input item (MACs = positions * weights)
    ks: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def dense(self) -> int:
        return self.f * self.c * self.kernel

    @property
    def bias(self) -> int:
        return self.module.bias.numel() if self.module.bias is not None else 0

    def max_rank(self, k: int) -> int:
        return min(self.f, self.c * self.kernel // k)

    def per_rank(self, k: int) -> int:
        """Weights per unit of rank: k*f (decoder) + c*kappa (encoder)."""
        return k * self.f + self.c * self.kernel

    def weights_at(self, k: int, rank: int) -> int:
        """Weights (bias excluded) at rank j: the decomposition's, or the dense layer's when that is smaller."""
        return min(self.dense, rank * self.per_rank(k))

    def decomposes(self, k: int, rank: int) -> bool:
        return rank * self.per_rank(k) < self.dense


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def find_candidates(model: nn.Module, include: tuple[str, ...], exclude: tuple[str, ...],
                    groups: tuple[int, ...] = (), min_group_channels: int = 1, example: torch.Tensor | None = None,
                    ) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Conv2d (groups = 1) and Linear layers selected by the patterns; grouped convolutions are listed as skipped,
    and so (given `example`, before any work) is every layer that a forward pass on it does not call, whose
    parameters another module reads directly (`direct_reads`), or whose low-rank replacement stops that forward
    (`replacement_breaks`).

    Each candidate's k are the divisors of its input channels that are in `groups` (when given) and leave at
    least `min_group_channels` channels per group; k = 1 is always allowed.
    """
    found, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if include and not any(matches(name, p) for p in include):
            continue
        if any(matches(name, p) for p in exclude):
            continue
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                skipped.append({"name": name, "reason": f"grouped convolution (groups={module.groups})"})
                continue
            cand = Candidate(name, module, module.out_channels, module.in_channels, int(np.prod(module.kernel_size)))
        else:
            cand = Candidate(name, module, module.out_features, module.in_features, 1)
        allowed = set(groups) | {1} if groups else None
        cand.ks = [k for k in divisors(cand.c) if (allowed is None or k in allowed)
                   and (k == 1 or cand.c // k >= min_group_channels)]
        found.append(cand)
    if found and example is not None:
        reads = direct_reads(model, found, example)
        found = [c for c in found if c.name not in reads]
        reads.update(replacement_breaks(model, found, example))
        skipped += [{"name": name, "reason": reason} for name, reason in reads.items()]
        found = [c for c in found if c.name not in reads]
    if not found:
        raise UsageError("no Conv2d/Linear layers to decompose match `include`/`exclude`; loosen the patterns")
    return found, skipped


@torch.no_grad()
def replacement_breaks(model: nn.Module, candidates: list[Candidate], example: torch.Tensor) -> dict[str, str]:
    """Layer name -> why it must stay dense, for the candidates whose replacement by a low-rank structure stops the
    forward pass on `example` (a parent reading an attribute such as `in_features`, which `direct_reads` cannot
    see). All are swapped in at once (rank 1, in place, put back after); only when that fails is each tried alone."""

    def fails(group: list[Candidate]) -> str | None:
        originals = [(c.name, c.module) for c in group]
        try:
            for c in group:
                model.set_submodule(c.name, build_lowrank(c.module, 1, 1))
            model(example[:1])
        except Exception as exc:  # noqa: BLE001 - whatever the model's forward raises
            return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        finally:
            for name, module in originals:
                model.set_submodule(name, module)
        return None

    candidates = [c for c in candidates if c.name]  # the model itself cannot be swapped out
    was_training = model.training
    model.eval()
    try:
        if not candidates or fails(candidates) is None:
            return {}
        return {c.name: f"replacing it by its low-rank form breaks the forward pass ({error}); left dense"
                for c in candidates if (error := fails([c])) is not None}
    finally:
        model.train(was_training)


class _ReadWatch(TorchFunctionMode):
    """Records, for each watched parameter, the first operation that uses it outside its own module's forward."""

    def __init__(self, owners: dict[int, tuple[str, str, nn.Module]], running: list[nn.Module],
                 names: dict[nn.Module, str]) -> None:
        super().__init__()
        self.owners, self.running, self.names = owners, running, names
        self.outside: dict[str, tuple[str, str]] = {}  # layer -> (parameter, module running when it was read)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            owner = self.owners.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if owner is not None and owner[2] not in self.running and owner[0] not in self.outside:
                self.outside[owner[0]] = (owner[1], self.names.get(self.running[-1], "") if self.running else "")
        return func(*args, **kwargs)


@torch.no_grad()
def direct_reads(model: nn.Module, candidates: list[Candidate], example: torch.Tensor) -> dict[str, str]:
    """Layer name -> why it must stay dense, for the candidates whose parameters a forward pass on `example` uses
    outside the layer's own forward (torchvision's Swin attention passes `qkv.weight` to F.linear itself), or that
    it never calls. One forward pass, watched at the torch-function level, before any work."""
    names = {m: n for n, m in model.named_modules()}
    owners = {id(p): (c.name, k, c.module) for c in candidates for k, p in c.module.named_parameters(recurse=False)}
    running: list[nn.Module] = []
    called: set[nn.Module] = set()

    def enter(module: nn.Module, _inputs: Any) -> None:
        running.append(module)
        called.add(module)

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        if running:
            running.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    watch = _ReadWatch(owners, running, names)
    was_training = model.training
    model.eval()
    try:
        with watch:
            model(example[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    reasons = {}
    for cand in candidates:
        if cand.name in watch.outside:
            param, reader = watch.outside[cand.name]
            where = f"{reader!r} ({type(model.get_submodule(reader)).__name__})" if reader else "the model"
            reasons[cand.name] = (f"its {param!r} is read directly by {where} instead of through the layer's "
                                  "forward, so a low-rank replacement would break that forward; left dense")
        elif cand.module not in called:
            reasons[cand.name] = "not called by the forward pass in eval mode (its parameters are used some other way, " \
                                 "only in training, or not at all); left dense"
    return reasons


@torch.no_grad()
def record_positions(model: nn.Module, candidates: list[Candidate], example: torch.Tensor) -> None:
    """Outputs per output channel of each candidate for one input item (a layer called twice counts twice)."""
    by_module = {id(c.module): c for c in candidates}
    for cand in candidates:
        cand.positions = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        cand = by_module[id(module)]
        cand.positions += output.numel() // cand.f

    handles = [c.module.register_forward_hook(hook) for c in candidates]
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------- allocation


@dataclass
class Curve:
    """One layer's error for one k at every rank: err[j] for j = 0..r, non-increasing, err[r] = 0."""

    k: int
    err: np.ndarray

    @property
    def rank(self) -> int:
        return len(self.err) - 1


def error_curve(k: int, sigma: np.ndarray, norm: float) -> Curve:
    """ALDS's bound: eps(k, j) = max_i sigma^(i)_{j+1} / ||W||_2."""
    worst = sigma.max(axis=0) if sigma.size else np.zeros(0)
    return Curve(k, np.append(worst / norm if norm > 0 else np.zeros_like(worst), 0.0))


@dataclass(frozen=True)
class Budget:
    """What is counted: the cost of each candidate per weight (1 for parameters, its positions for MACs), the cost
    outside the candidates' weights, the target, and what it is counted over."""

    units: tuple[int, ...]
    fixed: int
    total: int
    requested: float
    counted_over: str
    priced: bool = False  # a cost by measured time (see compress.methods.pricing.LatencyBudget), not by weights

    @property
    def target(self) -> float:
        return self.requested * self.total

    def options(self, index: int, cand: Candidate, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every rank 1..r of the layer for this k, with its cost."""
        ranks = np.arange(1, cand.max_rank(k) + 1, dtype=np.int64)
        return ranks, self.cost_at(index, cand, k, ranks)

    def cost_at(self, index: int, cand: Candidate, k: int, ranks: np.ndarray) -> np.ndarray:
        """The cost of the layer at these ranks: its weights (or MACs), never more than the dense layer's."""
        return self.units[index] * np.minimum(cand.dense, ranks * cand.per_rank(k))

    def within(self, cost: float) -> bool:
        """Whether a cost meets the request within KEEP_TOLERANCE."""
        return abs(cost - self.target) <= KEEP_TOLERANCE * self.target


@dataclass
class Allocation:
    """Ranks per candidate (for its k), and the resulting cost under each budget (the first is `budget`'s)."""

    ks: list[int]
    ranks: list[int]
    cost: float
    eps_star: float
    budget: Budget
    costs: tuple[float, ...] = ()
    also: tuple[Budget, ...] = ()

    @property
    def achieved(self) -> float:
        return self.cost / self.budget.total

    @property
    def within_tolerance(self) -> bool:
        return self.budget.within(self.cost) and all(
            c <= b.target * (1 + KEEP_TOLERANCE) for b, c in zip(self.also, self.costs[1:]))

    def score(self) -> tuple[bool, float, float]:
        """Smaller is better: the budget met within tolerance first, then the worst layer's error."""
        return (not self.within_tolerance, self.eps_star, abs(self.cost - self.budget.target))


def allocate(candidates: list[Candidate], curves: list[Curve], budget: Budget, *, split_ties: bool = False,
             errors: list[Curve] | None = None, also: tuple[Budget, ...] = ()) -> Allocation:
    """Find the common level eps* whose ranks j_l = max(1, #{j : err_l[j] > eps*}) meet the budget.

    Lowering the level past a value err_l[j] raises layer l from rank j to j+1; the values are visited from
    the largest down, so the prefix that fits the budget is found by one sort and a cumulative sum (an exact
    bisection over the breakpoints). Values that tie move together unless `split_ties` (for the constant-rank
    baseline, where whole families of layers tie). The cheaper prefix at or under the target is taken, unless
    it misses the tolerance and the next one meets it. `errors` (default: `curves`) give the reported eps*.

    A priced budget (measured milliseconds) offers each layer only its own options (ranks in steps, dense) and
    drops every option that a higher rank beats on every cost; `also` are further budgets that must hold too
    (the first to bind wins): the longest prefix meeting all of them is taken, so the sweep stays exact and a
    larger budget never gives a larger eps*.
    """
    budgets = (budget, *also)
    value, owner, prefix_cost, options = _breakpoints(candidates, curves, budgets)
    allowed = _allowed_prefixes(value, split_ties)
    n = int(allowed[_choose_prefix(prefix_cost[allowed], budgets)])
    counts = np.bincount(owner[:n], minlength=len(candidates))
    cost = prefix_cost[n]
    if len(budgets) > 1 or budget.priced:
        counts, cost = _fill(n, owner, prefix_cost, counts, np.array([b.target for b in budgets]))
    ranks = [int(ranks_l[c]) for ranks_l, c in zip(options, counts)]
    eps_star = _eps_star(candidates, curves, ranks, errors or curves)
    costs = tuple(cost.tolist())
    return Allocation([c.k for c in curves], ranks, costs[0], eps_star, budget, costs, also)


def _fill(n: int, owner: np.ndarray, prefix_cost: np.ndarray, counts: np.ndarray,
          targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spend what the prefix leaves of the budgets: the later steps, in the sweep's order, that still fit every
    budget (a layer that cannot take its next step takes none after it). With coarse options (ranks in steps,
    dense) the step after eps* can be a whole dense layer, and the prefix alone left a third of a parameter budget
    unused on resnet18; the filled steps only lower errors below eps*, so eps* stays what the sweep found."""
    counts, cost, blocked = counts.copy(), prefix_cost[n].copy(), set()
    for i in range(n, len(owner)):
        layer = int(owner[i])
        if layer in blocked:
            continue
        step = prefix_cost[i + 1] - prefix_cost[i]
        if np.all(cost + step <= targets * (1 + 1e-12)):
            cost, counts[layer] = cost + step, counts[layer] + 1
        else:
            blocked.add(layer)
    return counts, cost


def _layer_options(index: int, cand: Candidate, curve: Curve,
                   budgets: tuple[Budget, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's options for its k: ranks (ascending), their error levels and their cost under each budget."""
    priced = next((b for b in budgets if b.priced), None)
    ranks, first = (priced or budgets[0]).options(index, cand, curve.k)
    costs = np.column_stack([first if b is (priced or budgets[0]) else b.cost_at(index, cand, curve.k, ranks)
                             for b in budgets])
    err = curve.err[ranks]
    if priced is None and len(budgets) == 1:
        return ranks, err, costs  # costs rise with the rank: no option is dominated
    keep = _undominated(costs)
    return ranks[keep], err[keep], costs[keep]


def _undominated(costs: np.ndarray) -> np.ndarray:
    """Options that no higher rank (lower error) beats on every cost; the last (dense, error 0) always stays."""
    keep = np.ones(len(costs), dtype=bool)
    for i in range(len(costs) - 1):
        later = costs[i + 1:]
        keep[i] = not np.any(np.all(later <= costs[i], axis=1) & np.any(later < costs[i], axis=1))
    return keep


def _breakpoints(candidates: list[Candidate], curves: list[Curve], budgets: tuple[Budget, ...],
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """The levels err_l(option) from the largest down, the layer each moves up an option, the costs (one column per
    budget) after each prefix, and each layer's ranks."""
    values, deltas, owners, options = [], [], [], []
    cost0 = np.array([b.fixed for b in budgets])
    for index, (cand, curve) in enumerate(zip(candidates, curves)):
        ranks, err, costs = _layer_options(index, cand, curve, budgets)
        cost0 = cost0 + costs[0]
        values.append(err[:-1])
        deltas.append(np.diff(costs, axis=0))
        owners.append(np.full(len(ranks) - 1, index, dtype=np.int64))
        options.append(ranks)
    value = np.concatenate(values) if values else np.zeros(0)
    order = np.argsort(-value, kind="stable")  # stable: tied values keep the layers' order
    delta = np.concatenate(deltas)[order] if deltas else np.zeros((0, len(budgets)))
    value, owner = value[order], np.concatenate(owners)[order]
    return value, owner, cost0 + np.vstack([np.zeros((1, len(budgets)), dtype=delta.dtype),
                                            np.cumsum(delta, axis=0)]), options


def _allowed_prefixes(value: np.ndarray, split_ties: bool) -> np.ndarray:
    """The prefix lengths that may be taken: all with `split_ties`, else those that do not split tied values."""
    if split_ties:
        return np.arange(len(value) + 1)
    if not len(value):
        return np.zeros(1, dtype=np.int64)
    return np.unique(np.concatenate([[0], np.flatnonzero(value[1:] != value[:-1]) + 1, [len(value)]]))


def _choose_prefix(costs: np.ndarray, budgets: tuple[Budget, ...]) -> int:
    """Index of the prefix taken: the longest meeting every budget, or, for one budget by weights, the next if only
    it is within tolerance."""
    # a budget aimed by measurement (pricing.Calibration) was checked reachable on the measured floor: at worst it
    # takes the smallest allocation these k's allow, and landing and the audit judge the shipped model
    targets = np.array([max(b.target, costs[0, i]) if getattr(b, "aim", None) is not None else b.target
                        for i, b in enumerate(budgets)])
    feasible = np.flatnonzero(np.all(costs <= targets, axis=1))
    if not len(feasible):
        failing = next(i for i, b in enumerate(budgets) if costs[0, i] > b.target)
        budget, smallest = budgets[failing], costs[0, failing] / budgets[failing].total
        floor = "rank 1" if not budget.priced else "the smallest rank step"
        if not budget.priced and any(b.priced for b in budgets):
            floor = "the smallest priced option (a layer is decomposed only where that runs faster)"
            hint = ", or allocate by weights alone (--no-priced; the model may then run slower)"
        else:
            hint = ""
        raise UsageError(f"{budget.counted_over} keep ratio {budget.requested} is unreachable: {floor} in every "
                         f"decomposable layer keeps {smallest:.6f}; raise the keep ratio or decompose more "
                         f"layers{hint}")
    fits = int(feasible[-1])
    if len(budgets) > 1 or budgets[0].priced:
        return fits
    target, column = budgets[0].target, costs[:, 0]
    if fits + 1 < len(column) and column[fits] < target * (1 - KEEP_TOLERANCE) \
            and column[fits + 1] <= target * (1 + KEEP_TOLERANCE):
        return fits + 1
    return fits


def _eps_star(candidates: list[Candidate], curves: list[Curve], ranks: list[int], reported: list[Curve]) -> float:
    """The largest reported error over the layers that decompose at their ranks (0 when none does)."""
    eps = [float(reported[i].err[j]) for i, (cand, j) in enumerate(zip(candidates, ranks))
           if cand.decomposes(curves[i].k, j)]
    return max(eps, default=0.0)


def make_budget(model: nn.Module, candidates: list[Candidate], example: torch.Tensor, keep: float | None,
                macs_keep: float | None) -> Budget | None:
    """All parameters of the network (or its MACs with `macs_keep`) and what the candidates contribute; None when
    neither is asked for."""
    record_positions(model, candidates, example)
    if macs_keep is None and keep is None:
        return None
    if macs_keep is not None:
        total = count_macs(model, example).macs
        units = tuple(c.positions for c in candidates)
        fixed = total - sum(c.positions * c.dense for c in candidates)
        return Budget(units, fixed, total, macs_keep, "MACs")
    total = sum(p.numel() for p in model.parameters())
    fixed = total - sum(c.dense for c in candidates)
    return Budget(tuple(1 for _ in candidates), fixed, total, keep, "all parameters")


# ------------------------------------------------------------------------------------------------- k search


def nearest_divisors(candidates: list[Candidate], desired: int) -> list[int]:
    """Per layer, the allowed k nearest to `desired` (ties to the larger, as in the reference)."""
    return [min(c.ks, key=lambda k: (abs(k - desired), -k)) for c in candidates]


class KSearch:
    """The seeded iterative search over k (METHODS.md §3) on float32 error curves."""

    def __init__(self, candidates: list[Candidate], budget: Budget, progress: Callable[[str, int, int], None] | None,
                 also: tuple[Budget, ...] = ()):
        self.candidates, self.budget, self.also = candidates, budget, also
        self.curves: list[dict[int, Curve]] = []
        for index, cand in enumerate(candidates):
            sigma = group_singular_values(cand.module.weight, cand.ks)
            norm = float(sigma[1][0, 0]) if sigma[1].size else 0.0
            self.curves.append({k: error_curve(k, s, norm) for k, s in sigma.items()})
            if progress:
                progress("alds: spectra", index + 1, len(candidates))
        # per layer: candidate ks, weights per rank, max ranks and the padded error table
        self.tables = []
        for cand, curves in zip(candidates, self.curves):
            ks = np.array(cand.ks)
            width = max(c.rank for c in curves.values()) + 1
            table = np.zeros((len(ks), width))
            for row, k in enumerate(cand.ks):
                table[row, :curves[k].rank + 1] = curves[k].err
            self.tables.append((ks, np.array([cand.per_rank(k) for k in cand.ks]),
                                np.array([cand.max_rank(k) for k in cand.ks]), table))

    def allocate(self, ks: list[int]) -> Allocation:
        return allocate(self.candidates, [curves[k] for curves, k in zip(self.curves, ks)], self.budget,
                        also=self.also)

    def improve(self, current: Allocation) -> list[int]:
        """Per layer, the k with the smallest error for what the binding budget gives the layer now: its time when
        the latency budget binds, else its weights (ties: smaller k)."""
        if self.budget.priced and self.time_binds(current):
            return self.improve_priced(current)
        return self.improve_by_weights(current)

    def time_binds(self, current: Allocation) -> bool:
        """Whether the latency budget is the one nearest its limit (with parameters or MACs as well, they may bind
        instead, and then searching k at each layer's time share would trade error for time no one asked for)."""
        used = [c / b.target for b, c in zip((self.budget, *self.also), current.costs or (current.cost,))]
        return used[0] >= max(used)

    def improve_by_weights(self, current: Allocation) -> list[int]:
        """Per layer, the k with the smallest error for the weights the layer holds now (ties: smaller k)."""
        chosen = []
        for cand, (ks, per_rank, max_rank, table), k, j in zip(self.candidates, self.tables, current.ks,
                                                               current.ranks):
            share = cand.weights_at(k, j)
            ranks = np.minimum(share // per_rank, max_rank)
            err = np.where(ranks >= 1, table[np.arange(len(ks)), np.maximum(ranks, 0)], np.inf)
            chosen.append(int(ks[int(np.argmin(err))]))
        return chosen

    def improve_priced(self, current: Allocation) -> list[int]:
        """Per layer, the k with the smallest error for the time the layer takes now (ties: smaller k): the group
        count searched at each layer's latency share."""
        chosen = []
        for index, (cand, curves, k, j) in enumerate(zip(self.candidates, self.curves, current.ks, current.ranks)):
            share = float(self.budget.cost_at(index, cand, k, np.array([j]))[0])
            best = (np.inf, k)
            for other in cand.ks:
                ranks, costs = self.budget.options(index, cand, other)
                fits = ranks[costs <= share * (1 + 1e-9)]
                if len(fits):
                    best = min(best, (float(curves[other].err[fits].min()), other))
            chosen.append(best[1])
        return chosen

    def feasible_start(self, ks: list[int]) -> Allocation:
        """The allocation for `ks`, halving k where rank 1 everywhere would still overshoot the budget."""
        while True:
            try:
                return self.allocate(ks)
            except UsageError:
                if all(k == 1 for k in ks):
                    raise
                ks = [1 if k == 1 else min(c.ks, key=lambda d, half=k // 2: (abs(d - half), -d))
                      for c, k in zip(self.candidates, ks)]

    def seed_ks(self, index: int, rng: np.random.Generator) -> list[int]:
        if index < len(FIXED_K_SEEDS):
            return nearest_divisors(self.candidates, FIXED_K_SEEDS[index])
        return [int(rng.choice(c.ks)) for c in self.candidates]

    def run(self, seeds: int, rounds: int, seed: int) -> tuple[Allocation, dict[str, Any]]:
        """Best allocation over the seeds; each seed keeps its best round (only if it beats its start)."""
        rng = np.random.default_rng(seed)
        best, best_seed, history = None, -1, []
        for index in range(seeds):
            start = self.feasible_start(self.seed_ks(index, rng))
            current = kept = start
            for _ in range(rounds):
                ks = self.improve(current)
                if ks == current.ks:
                    break
                try:
                    current = self.allocate(ks)
                except UsageError:  # rank 1 everywhere overshoots after all: keep what this seed has
                    break
                if current.score() < kept.score():
                    kept = current
            history.append({"seed": index, "start_eps": start.eps_star, "eps": kept.eps_star})
            if best is None or kept.score() < best.score():
                best, best_seed = kept, index
        return best, {"seeds": history, "best_seed": best_seed}


# ------------------------------------------------------------------------------------------------- apply


def _relative_rank_curve(rank: int) -> Curve:
    """The svd baseline's level: at relative rank a = 1 - level a layer keeps round(a * r) (at least 1)."""
    j = np.arange(rank, dtype=np.float64)
    return Curve(1, np.append(1.0 - (j + 0.5) / rank, 0.0))


def _energy_curve(sigma: np.ndarray) -> Curve:
    """The svd-energy baseline's level: relative Frobenius error sqrt(sum_{t>j} sigma_t^2 / sum sigma^2)."""
    squares = sigma[0] ** 2
    tail = np.append(np.cumsum(squares[::-1])[::-1], 0.0)
    total = tail[0]
    return Curve(1, np.sqrt(tail / total) if total > 0 else np.zeros_like(tail))


def decompose(model: nn.Module, candidates: list[Candidate], factors: list[Factors], allocation: Allocation,
              curves: list[Curve], budget: Budget) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replace each layer that saves weights by its LowRank structure; per-layer rows and the transforms."""
    rows, transforms = [], []
    for cand, fac, curve, k, j in zip(candidates, factors, curves, allocation.ks, allocation.ranks):
        module = cand.module
        weight64 = module.weight.detach().to("cpu", torch.float64).reshape(cand.f, -1)
        row: dict[str, Any] = {"name": cand.name, "kind": cand.kind, "shape_before": list(module.weight.shape),
                               "params_before": cand.dense + cand.bias, "macs_before": cand.positions * cand.dense,
                               "max_rank": cand.max_rank(k)}
        if not cand.decomposes(k, j):
            row.update(shape_after=list(module.weight.shape), params_after=row["params_before"],
                       macs_after=row["macs_before"], decomposed=False, groups=None, rank=None, eps_bound=0.0,
                       err_spectral=0.0, err_frobenius=0.0)
            rows.append(row)
            continue
        target = build_lowrank(module, k, j)
        decoder, encoder = lowrank_weights(module.weight, fac, j)
        load_lowrank(target, module, decoder, encoder)
        model.set_submodule(cand.name, target)
        residual = weight64 - reconstructed(target, k)
        norm = fac.norm
        frobenius = float(torch.linalg.vector_norm(weight64))
        row.update(shape_after=[list(target.encoder.weight.shape), list(target.decoder.weight.shape)],
                   params_after=j * cand.per_rank(k) + cand.bias, macs_after=cand.positions * j * cand.per_rank(k),
                   decomposed=True, groups=k, rank=j, eps_bound=float(curve.err[j]),
                   err_spectral=spectral_norm(residual) / norm if norm > 0 else 0.0,
                   err_frobenius=float(torch.linalg.vector_norm(residual)) / frobenius if frobenius > 0 else 0.0)
        rows.append(row)
        transforms.append({"type": TRANSFORM, "layer": cand.name, "groups": k, "rank": j})
    return rows, transforms


def _summary(method: str, model: nn.Module, prep: Prepared, allocation: Allocation, rows: list[dict[str, Any]],
             extra: dict[str, Any]) -> dict[str, Any]:
    """The keep section (requested, achieved over what), eps*, the counts behind them, and method details. With a
    latency budget `achieved` is the predicted latency ratio (the measured one is audited on the shipped model)."""
    budget, params_before = prep.budget, prep.params_before
    params_after = sum(p.numel() for p in model.parameters())
    macs_after = count_macs(model, prep.example).macs if prep.macs_before is not None else None
    if budget.priced:
        achieved = allocation.cost / budget.total
        if prep.calibration is not None:
            achieved = prep.calibration.measured(achieved)
    elif macs_after is not None:
        achieved = macs_after / prep.macs_before
    else:
        achieved = params_after / params_before
    keep = {"requested": budget.requested, "achieved": achieved, "counted_over": budget.counted_over}
    summary = {"method": method, "keep": keep, "keep_requested": budget.requested, "keep_achieved": achieved,
               "keep_counted_over": budget.counted_over, "keep_tolerance": KEEP_TOLERANCE,
               "eps_star": allocation.eps_star, "params_before": params_before, "params_after": params_after,
               "params_keep": params_after / params_before, "allocated_cost": allocation.cost,
               "budget_total": budget.total, "layers_decomposed": sum(r["decomposed"] for r in rows),
               "layers_dense": sum(not r["decomposed"] for r in rows), "skipped": prep.skipped,
               "worst_err_spectral": max((r["err_spectral"] for r in rows), default=0.0)}
    if prep.also:
        summary["also"] = [{"requested": b.requested, "counted_over": b.counted_over, "achieved": c / b.total}
                           for b, c in zip(prep.also, allocation.costs[1:])]
    if macs_after is not None:
        summary.update(macs_before=prep.macs_before, macs_after=macs_after)
    summary.update(extra)
    return summary


@dataclass
class Prepared:
    """What every low-rank method starts from: its candidates, the budgets (the first binds the search) and the
    counts before."""

    candidates: list[Candidate]
    skipped: list[dict[str, str]]
    example: torch.Tensor
    budget: Budget
    also: tuple[Budget, ...]
    params_before: int
    macs_before: int | None
    calibration: pricing.Calibration | None = None  # a latency budget's measured points (pricing.land)
    landing: list[dict[str, float]] = field(default_factory=list)


def _prepare(model: nn.Module, cfg: SVDConfig | ALDSConfig, ctx: Context, groups: tuple[int, ...] = (),
             prices: Prices | None = None, outside_ms: float | None = None) -> Prepared:
    """Candidates and budgets: by weights (keep or macs_keep), and with latency_keep by price on the backend
    (`prices`: a cost table to use instead of the backend's own, for tests)."""
    example = ctx.example_inputs
    candidates, skipped = find_candidates(model, cfg.include, cfg.exclude, groups,
                                          getattr(cfg, "min_group_channels", 1), example)
    by_weights = make_budget(model, candidates, example, params_keep(cfg), cfg.macs_keep)
    budgets: tuple[Any, ...] = (by_weights,) if by_weights is not None else ()
    calibration = None
    if latency_keep_of(cfg) is not None:
        pricing.priced_ks(candidates)
        by_time = pricing.latency_budget(model, candidates, example, cfg, prices or pricing.cost_model_for(cfg),
                                         outside_ms)
        if isinstance(by_time.prices, pricing.CostModel):
            calibration = pricing.Calibration()
            by_time = _aimed(model, candidates, by_time, calibration, example, pricing.timing_inputs(ctx))
        budgets = (by_time, *budgets)
    macs_before = by_weights.total if by_weights is not None and by_weights.counted_over == "MACs" else None
    return Prepared(candidates, skipped, example, budgets[0], budgets[1:],
                    sum(p.numel() for p in model.parameters()), macs_before, calibration)


def _aimed(model: nn.Module, candidates: list[Candidate], budget: Any, calibration: pricing.Calibration,
           example: torch.Tensor, calibration_x: torch.Tensor) -> Any:
    """The latency budget aimed at the predicted ratio that stands for the request, from one measured probe: the
    model with every layer at its cheapest priced option (random weights: only its time counts). A request that
    even this floor misses, as measured, by more than the audit allows for timing noise, is refused before any
    work."""
    floor = copy.deepcopy(model).eval()
    floor_ms = budget.fixed
    for index, cand in enumerate(candidates):
        k, rank, ms = min(((k, int(r), float(m)) for k in cand.ks for r, m in zip(*budget.options(index, cand, k))),
                          key=lambda option: option[2])
        floor_ms += ms
        if cand.decomposes(k, rank):
            floor.set_submodule(cand.name, build_lowrank(cand.module, k, rank))
    predicted = floor_ms / budget.total
    measured = pricing.measured_ratio(floor, model, example, calibration_x, budget.prices.backend,
                                      budget.prices.batch)["latency_measured"]
    calibration.add(predicted, measured)
    if measured > budget.requested * (1 + pricing.LATENCY_TOLERANCE):  # the audit's allowance for timing noise
        floor = f"every decomposable layer at its cheapest priced option measures {measured:.3f} of the original"
        if not budget.asked:
            raise UsageError(f"low rank does not make this model faster on {budget.prices.backend}: {floor}'s "
                             f"latency (predicted {predicted:.3f}); allocate by weights alone (--no-priced; the "
                             "model may then run slower), or remove channels (pagcp)")
        raise UsageError(f"{budget.counted_over} keep ratio {budget.requested} is unreachable by low rank: {floor} "
                         f"(predicted {predicted:.3f}); raise the keep ratio, or remove channels (pagcp "
                         "--latency-target), which also shrinks the time outside the layers")
    return dataclasses.replace(budget, aim=max(calibration.predicted(budget.requested), predicted))


FactorCache = dict[tuple[int, int], Factors]  # (candidate index, k) -> its exact factors
Decomposition = tuple[Allocation, list[Factors], list[Curve]]  # an allocation and the factors it cuts


def _exact(prep: Prepared, ks: list[int], ctx: Context, cache: FactorCache | None = None,
           ) -> tuple[list[Factors], list[Curve]]:
    """float64 factors for the given k's (from `cache` where already computed) and their exact ALDS curves."""
    cache = {} if cache is None else cache
    for index, (cand, k) in enumerate(zip(prep.candidates, ks)):
        if (index, k) not in cache:
            cache[index, k] = exact_factors(cand.module.weight, k)
        if ctx.progress:
            ctx.progress("decompose: spectra", index + 1, len(prep.candidates))
    factors = [cache[index, k] for index, k in enumerate(ks)]
    return factors, [error_curve(fac.k, fac.sigma, fac.norm) for fac in factors]


def _final(model: nn.Module, prep: Prepared, ks: list[int],
           level_curves: Callable[[list[Factors]], list[Curve]] | None, split_ties: bool,
           ctx: Context, cache: FactorCache | None = None) -> Decomposition:
    """float64 factors for the chosen k's, the exact ALDS curves, and the allocation (by `level_curves` if given);
    a latency budget on a real backend is then landed on the measured latency (`_landed`)."""
    factors, curves = _exact(prep, ks, ctx, cache)
    levels = level_curves(factors) if level_curves else curves

    def allocate_at(budget: Budget) -> Allocation:
        return allocate(prep.candidates, levels, budget, split_ties=split_ties, errors=curves, also=prep.also)

    allocation = allocate_at(prep.budget)
    if prep.budget.priced and isinstance(prep.budget.prices, pricing.CostModel):
        allocation = _landed(model, prep, allocation, allocate_at, factors, curves, ctx)
    return allocation, factors, curves


def _landed(model: nn.Module, prep: Prepared, first: Allocation, allocate_at: Callable[[Any], Allocation],
            factors: list[Factors], curves: list[Curve], ctx: Context) -> Allocation:
    """The latency request met as measured: ranks re-allocated (the k's kept) at the predicted ratio that the
    models measured so far say stands for it (pricing.land); each trial is built on a copy and timed against the
    original. A predicted ratio below what the layers can reach keeps the smallest reachable allocation."""
    budget = prep.budget
    calibration_x = pricing.timing_inputs(ctx)
    prices = budget.prices

    def plan_at(target: float) -> tuple[Allocation, float, nn.Module]:
        trial = first
        if abs(target - budget.aimed) > 1e-12:
            try:
                trial = allocate_at(dataclasses.replace(budget, aim=target))
            except UsageError:
                trial = first
        built = copy.deepcopy(model).eval()
        decompose(built, prep.candidates, factors, trial, curves, budget)
        return trial, trial.cost / budget.total, built

    def measure(built: nn.Module) -> float:
        return pricing.measured_ratio(built, model, prep.example, calibration_x, prices.backend,
                                      prices.batch)["latency_measured"]

    landing = pricing.land(budget.requested, plan_at, measure, prep.calibration or pricing.Calibration())
    prep.landing = landing.tried
    return landing.plan


def _finish(method: str, model: nn.Module, prep: Prepared, allocation: Allocation, factors: list[Factors],
            curves: list[Curve], extra: dict[str, Any]) -> Result:
    """Decompose, price what shipped (with latency_keep) and build the result."""
    rows, transforms = decompose(model, prep.candidates, factors, allocation, curves, prep.budget)
    sections: dict[str, Any] = {}
    if prep.budget.priced:
        pricing.layer_times(rows, model, prep.example, prep.budget, list(zip(allocation.ks, allocation.ranks)),
                            prep.candidates)
        sections["latency_target"] = pricing.latency_section(prep.budget, allocation.cost, prep.budget.prices,
                                                             prep.calibration, prep.landing)
    summary = _summary(method, model, prep, allocation, rows, extra)
    sections["keep"] = summary["keep"]
    return Result(model, layers=rows, summary=summary, transforms=transforms, sections=sections)


def audit(result: Result, cfg: SVDConfig | ALDSConfig, shipped: nn.Module, original: nn.Module,
          ctx: Context) -> AuditOutcome:
    """Every budget counted afresh on the shipped and the original model: the kept fraction of all parameters (or
    of MACs) within KEEP_TOLERANCE of the request (only as a ceiling when latency_keep binds too), and the latency
    measured against the original on the priced backend (pricing.audit_latency)."""
    outcome = AuditOutcome()
    requested = cfg.macs_keep if cfg.macs_keep is not None else params_keep(cfg)
    if requested is not None:
        over = "MACs" if cfg.macs_keep is not None else "all parameters"
        achieved = _kept(shipped, original, ctx.example_inputs, over)
        outcome.figures.update(keep_achieved=achieved, counted_over=over)
        ceiling_only = latency_keep_of(cfg) is not None
        if achieved > requested * (1 + KEEP_TOLERANCE) or (
                not ceiling_only and achieved < requested * (1 - KEEP_TOLERANCE)):
            outcome.problems.append(f"kept {achieved:.6f} of {over}, requested {requested} (off by more than "
                                    f"{KEEP_TOLERANCE:.1%}; on small layers one rank step can be larger than that: "
                                    "change the keep ratio slightly)")
    latency_keep = latency_keep_of(cfg)
    if latency_keep is not None:
        calibration = pricing.timing_inputs(ctx)
        problems, figures = pricing.audit_latency(shipped, original, ctx.example_inputs, calibration, cfg.backend,
                                                  cfg.latency_batch, latency_keep)
        if cfg.latency_keep is None:  # nobody typed the 1.0: say where it comes from
            problems = [f"{p} (the no-slower budget priced ALDS keeps by default; --no-priced drops it)"
                        for p in problems]
        outcome.problems += problems
        outcome.figures.update(figures)
    return outcome


def _kept(shipped: nn.Module, original: nn.Module, example: torch.Tensor, over: str) -> float:
    """The fraction of MACs or of all parameters the shipped model keeps, counted on both models."""
    if over == "MACs":
        return count_macs(shipped, example).macs / count_macs(original, example).macs
    return sum(p.numel() for p in shipped.parameters()) / sum(p.numel() for p in original.parameters())


def run_alds(model: nn.Module, cfg: ALDSConfig, ctx: Context, prices: Prices | None = None,
             outside_ms: float | None = None) -> Result:
    """ALDS with an explicit cost table (`prices`) and time outside the layers, for tests and benchmarks."""
    prep = _prepare(model, cfg, ctx, cfg.groups, prices, outside_ms)
    search = KSearch(prep.candidates, prep.budget, ctx.progress, prep.also)
    best, log = search.run(cfg.seeds, cfg.rounds, ctx.seed)
    extra: dict[str, Any] = {"search": dict(log, seeds_tried=cfg.seeds, rounds=cfg.rounds,
                                            search_eps=best.eps_star)}
    cache: FactorCache = {}
    compare = cfg.compare_plain and prep.budget.priced and ctx.splits is not None and any(k > 1 for k in best.ks)
    plain_prep = dataclasses.replace(prep, calibration=copy.deepcopy(prep.calibration)) if compare else prep
    final = _final(model, prep, best.ks, None, False, ctx, cache)
    if compare:
        try:
            plain = _final(model, plain_prep, [1] * len(prep.candidates), None, False, ctx, cache)
        except UsageError as err:
            extra["compare_plain"] = {"shipped": "search", "why": f"plain low rank cannot meet the budgets: {err}"}
        else:
            shipped, extra["compare_plain"] = _compare_plain(model, {"search": (prep, final),
                                                                     "plain": (plain_prep, plain)}, ctx)
            if shipped == "plain":
                prep, final = plain_prep, plain
    return _finish("alds", model, prep, *final, extra)


PLAIN_Z = 2.0        # paired standard errors by which one allocation's calibration loss must beat the other's
PLAIN_TIE = 0.05     # predicted latencies this close are a tie (table noise), and the search (the paper's) is incumbent
PLAIN_ITEMS = 512    # calibration items both allocations are evaluated on


def _compare_plain(model: nn.Module, finals: dict[str, tuple[Prepared, Decomposition]], ctx: Context,
                   ) -> tuple[str, dict[str, Any]]:
    """Which of the searched k's and plain low rank (k = 1 everywhere), each allocated (and landed) under the run's
    budgets, ships: each is built and evaluated as shipped on the calibration split, and the one predicted faster
    ships unless the other's loss is lower on some task by more than PLAIN_Z paired standard errors and higher
    beyond them on none."""
    assert ctx.splits is not None
    split = ctx.splits.calibration.subset(PLAIN_ITEMS)
    oracle = Oracle(split.x, split.y, tuple(ctx.tasks) if ctx.tasks else (CLASSIFICATION,),
                    as_shipped=ctx.finalize is not None)
    predicted, items = {}, {}
    for name, (prep, (allocation, factors, curves)) in finals.items():
        trial = copy.deepcopy(model).eval()
        decompose(trial, prep.candidates, factors, allocation, curves, prep.budget)
        predicted[name] = allocation.cost / prep.budget.total
        items[name] = oracle.probe_items(trial)
    shipped, incumbent, z = choose_plain_or_search(predicted, items)
    other = "search" if incumbent == "plain" else "plain"
    why = (f"{other}'s calibration loss is lower beyond {PLAIN_Z:g} paired standard errors" if shipped == other else
           f"{incumbent} is predicted {'faster' if incumbent == 'plain' else 'no slower'} and {other}'s calibration "
           f"loss is not lower beyond {PLAIN_Z:g} paired standard errors on a task without being higher on another")
    return shipped, {"items": len(split.y), "predicted_latency": predicted, "incumbent": incumbent,
                     "shipped": shipped, "why": why, "paired_z": dict(zip(oracle.names, map(float, z))),
                     "calibration_loss": {name: dict(zip(oracle.names, map(float, loss.mean(axis=1))))
                                          for name, loss in items.items()}}


def choose_plain_or_search(predicted: dict[str, float], items: dict[str, np.ndarray]) -> tuple[str, str, np.ndarray]:
    """(shipped, incumbent, z): the incumbent is "plain" when predicted faster by more than PLAIN_TIE, else
    "search"; the other ships when its item losses (tasks x items) are lower than the incumbent's by more than
    PLAIN_Z paired standard errors on some task and higher beyond them on none. z < 0: the other's loss is lower."""
    incumbent = "plain" if predicted["plain"] < predicted["search"] * (1 - PLAIN_TIE) else "search"
    other = "search" if incumbent == "plain" else "plain"
    z = paired_z(items[other], items[incumbent])
    switch = bool((z < -PLAIN_Z).any() and not (z > PLAIN_Z).any())
    return (other if switch else incumbent), incumbent, z


def paired_z(losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per task (rows), the mean paired difference of item losses over its standard error (0 where both agree)."""
    diff = losses - reference
    n = diff.shape[1]
    if n < 2:
        return np.zeros(diff.shape[0])
    se = diff.std(axis=1, ddof=1) / math.sqrt(n)
    mean = diff.mean(axis=1)
    z = np.where(mean > 0, np.inf, np.where(mean < 0, -np.inf, 0.0))  # every item differs alike: no noise
    return np.divide(mean, se, out=z, where=se > 0)


def report_sections(report: dict[str, Any]) -> list[ReportSection]:
    """The searched k's against plain low rank, when priced ALDS compared them on calibration data."""
    figures = (report.get("summary") or {}).get("compare_plain")
    if not figures or "calibration_loss" not in figures:
        return []
    tasks = list(figures["calibration_loss"]["search"])
    rows = [(name, f"{figures['predicted_latency'][name]:.3f}",
             *(f"{figures['calibration_loss'][name][t]:.4g}" for t in tasks),
             "shipped" if name == figures["shipped"] else "") for name in ("search", "plain")]
    z = ", ".join(f"{t} {v:+.2f}" for t, v in figures["paired_z"].items())
    return [ReportSection("Searched k against plain low rank", ("allocation", "predicted latency / original",
                                                                  *(f"{t} loss" for t in tasks), ""), rows,
                          f"Both under the run's budgets, evaluated as shipped on {figures['items']} calibration "
                          f"items; paired z of the other against the incumbent ({figures['incumbent']}): {z}. "
                          f"{figures['why'][0].upper()}{figures['why'][1:]}.")]


@register("alds", ALDSConfig, audit=audit, layer_kind="lowrank", report_sections=report_sections)
def apply(model: nn.Module, cfg: ALDSConfig, ctx: Context) -> Result:
    """Decompose `model` in place: k per layer by the seeded search, then ranks at the common error level eps*."""
    return run_alds(model, cfg, ctx)


def run_svd(method: str, model: nn.Module, cfg: SVDConfig, ctx: Context, prices: Prices | None = None,
            outside_ms: float | None = None) -> Result:
    """A k = 1 baseline (`svd`: one relative rank; `svd-energy`: one fraction of Frobenius energy) under the same
    budgets as ALDS."""
    prep = _prepare(model, cfg, ctx, (), prices, outside_ms)
    for cand in prep.candidates:
        cand.ks = [1]
    levels: list[Curve] = []

    def level_curves(facs: list[Factors]) -> list[Curve]:
        levels[:] = [_relative_rank_curve(f.sigma.shape[1]) if method == "svd" else _energy_curve(f.sigma)
                     for f in facs]
        return levels

    allocation, factors, curves = _final(model, prep, [1] * len(prep.candidates), level_curves, method == "svd",
                                         ctx)
    if method == "svd":
        relative = [r / c.max_rank(1) for r, c in zip(allocation.ranks, prep.candidates)]
        extra: dict[str, Any] = {"relative_rank": {"min": min(relative), "max": max(relative)}}
    else:
        frob = [float(e.err[j]) for e, j, c, k in zip(levels, allocation.ranks, prep.candidates, allocation.ks)
                if c.decomposes(k, j)]
        extra = {"energy_kept": 1.0 - max(frob, default=0.0) ** 2}
    return _finish(method, model, prep, allocation, factors, curves, extra)


@register("svd", SVDConfig, audit=audit, layer_kind="lowrank")
def apply_svd(model: nn.Module, cfg: SVDConfig, ctx: Context) -> Result:
    """Truncated SVD (k = 1) with one relative rank in every layer, chosen to meet the budget."""
    return run_svd("svd", model, cfg, ctx)


@register("svd-energy", SVDEnergyConfig, audit=audit, layer_kind="lowrank")
def apply_svd_energy(model: nn.Module, cfg: SVDEnergyConfig, ctx: Context) -> Result:
    """Truncated SVD (k = 1) keeping in every layer the smallest rank with a common fraction of Frobenius energy."""
    return run_svd("svd-energy", model, cfg, ctx)
