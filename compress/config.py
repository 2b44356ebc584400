"""Frozen, keyword-only configs, validated on construction, round-tripping through dicts (recipes, reports)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from compress.errors import UsageError

T = TypeVar("T", bound="ConfigBase")


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raise a UsageError naming `name`, its value and the allowed range when outside it."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise UsageError(f"{name} = {value} is out of range; allowed {left}{low}, {high}{right}")


def _check_count(name: str, value: Any, low: int, note: str = "") -> None:
    """Raise a UsageError unless `value` is a whole number >= low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"{name} = {value!r} must be a whole number >= {low}" + (f" {note}" if note else ""))


def _task_taus(value: Any) -> tuple[tuple[str, float], ...]:
    """Per-task bounds from a mapping, (name, tau) pairs or `name=tau` strings, sorted by name and checked."""
    items = value.items() if isinstance(value, dict) else value
    pairs = []
    for item in items:
        if isinstance(item, str):
            name, sep, number = item.partition("=")
            if not sep:
                raise UsageError(f"task_tau {item!r} must be NAME=TAU, e.g. position=2")
            item = (name.strip(), number)
        try:
            name, tau = str(item[0]), float(item[1])
        except (TypeError, ValueError, IndexError):
            raise UsageError(f"task_tau {item!r} must be NAME=TAU with a number, e.g. position=2") from None
        _check_range(f"task_tau[{name}]", tau, 1.0, 1e12, low_open=True)
        pairs.append((name, tau))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UsageError(f"task_tau names a task twice: {names}; give each task one bound")
    return tuple(sorted(pairs))


@dataclass(frozen=True, kw_only=True)
class ConfigBase:
    """Shared dict round-trip for every config."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown key(s) {unknown} for {cls.__name__}; allowed: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def matches(name: str, pattern: str) -> bool:
    """Whether a module name matches a pattern: `re:REGEX` (search) or an fnmatch glob."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def validate_patterns(patterns: tuple[str, ...], option: str) -> None:
    """Fail early on regexes that do not compile."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise UsageError(f"{option} pattern {pattern!r} is not a valid regex ({exc}); "
                                 "fix it or use a glob without the re: prefix") from None


@dataclass(frozen=True, kw_only=True)
class GlobalMPConfig(ConfigBase):
    """Global magnitude pruning (Gupta et al.) with per-layer floors, one-shot or gradual."""

    sparsity: float = 0.9
    min_threshold: float = 0.0   # percent of all prunable weights that each layer keeps (the paper's MT)
    min_keep: float = 0.0        # fraction of its own weights that each layer keeps
    include: tuple[str, ...] = ()   # module-name patterns to prune; empty: every Conv/Linear
    exclude: tuple[str, ...] = ()
    schedule: str = "oneshot"    # "oneshot" or "gradual" (cubic, across fine-tuning)
    initial_sparsity: float = 0.0  # gradual: sparsity at the first pruning step

    def __post_init__(self) -> None:
        _check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        _check_range("min_threshold", self.min_threshold, 0.0, 100.0)
        _check_range("min_keep", self.min_keep, 0.0, 1.0)
        _check_range("initial_sparsity", self.initial_sparsity, 0.0, self.sparsity)
        if self.schedule not in ("oneshot", "gradual"):
            raise UsageError(f"schedule = {self.schedule!r} is unknown; choose oneshot or gradual")
        validate_patterns(self.include, "--include")
        validate_patterns(self.exclude, "--exclude")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(ConfigBase):
    """Fine-tuning (and training) recipe: the paper's cosine schedule, label smoothing, optional distillation."""

    epochs: int = 1
    optimizer: str = "sgd"       # "sgd" or "adamw"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    batch_size: int = 128
    augment: bool = True
    distill: bool = False        # distil from the uncompressed model
    distill_temperature: float = 4.0
    distill_alpha: float = 0.5   # weight of the distillation term
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise UsageError(f"epochs = {self.epochs} must be >= 0")
        if self.optimizer not in ("sgd", "adamw"):
            raise UsageError(f"optimizer = {self.optimizer!r} is unknown; choose sgd or adamw")
        _check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _check_range("distill_alpha", self.distill_alpha, 0.0, 1.0)
        _check_range("distill_temperature", self.distill_temperature, 0.0, 100.0, low_open=True)
        if self.batch_size < 1:
            raise UsageError(f"batch_size = {self.batch_size} must be >= 1")


RECIPE_KEYS = ("method", "model", "data", "seed", "config", "finetune")


def load_recipe(path: str) -> dict[str, Any]:
    """Read a YAML recipe (the shape of recipe.resolved.yaml) and check its top-level keys."""
    import yaml

    try:
        with open(path) as handle:
            recipe = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path!r} ({exc.strerror}); check the path") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {path!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {path!r} must be a mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise UsageError(f"recipe {path!r} has unknown key(s) {unknown}; allowed: {', '.join(RECIPE_KEYS)}")
    return recipe


def _check_budget(keep: float, macs_keep: float | None) -> None:
    """The keep ratio (of all parameters) and the optional MACs keep ratio lie in (0, 1]."""
    _check_range("keep", keep, 0.0, 1.0, low_open=True)
    if macs_keep is not None:
        _check_range("macs_keep", macs_keep, 0.0, 1.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class ALDSConfig(ConfigBase):
    """ALDS (Liebenwein et al. 2021): per-layer rank j and channel groups k minimising the worst relative error.

    The budget is `keep` x all parameters of the network, or `macs_keep` x its MACs when that is given (then
    `keep` is not used). The seeded k search uses the run's seed.
    """

    keep: float = 0.5            # fraction of ALL parameters kept (norms, biases, untouched layers included)
    macs_keep: float | None = None  # when given: the budget is this fraction of MACs instead of parameters
    groups: tuple[int, ...] = ()   # candidate k per layer (used where k divides the input channels); empty: all
    # k only where each group keeps at least this many input channels: narrow groups cut MACs but run slowly on
    # dense runtimes (ONNX Runtime, mobile); 1 allows every divisor, as the paper does
    min_group_channels: int = 1
    seeds: int = 15              # starting points of the k search: k nearest 3, 5, 7, 9, then random divisors
    rounds: int = 4              # k re-assignment rounds per seed
    include: tuple[str, ...] = ()  # module-name patterns to decompose; empty: every Conv2d/Linear
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_budget(self.keep, self.macs_keep)
        for k in self.groups:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise UsageError(f"groups = {list(self.groups)} must hold integers >= 1 (candidate channel groups k)")
        if self.min_group_channels < 1:
            raise UsageError(f"min_group_channels = {self.min_group_channels} must be >= 1 (1 allows every k)")
        if self.seeds < 1:
            raise UsageError(f"seeds = {self.seeds} must be >= 1")
        if self.rounds < 0:
            raise UsageError(f"rounds = {self.rounds} must be >= 0")
        validate_patterns(self.include, "--include")
        validate_patterns(self.exclude, "--exclude")


@dataclass(frozen=True, kw_only=True)
class SVDConfig(ConfigBase):
    """Truncated SVD baseline (k = 1): one relative rank for every layer, chosen to meet the budget."""

    keep: float = 0.5
    macs_keep: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_budget(self.keep, self.macs_keep)
        validate_patterns(self.include, "--include")
        validate_patterns(self.exclude, "--exclude")


@dataclass(frozen=True, kw_only=True)
class SVDEnergyConfig(SVDConfig):
    """Truncated SVD baseline (k = 1): each layer keeps the smallest rank holding a common fraction of its
    Frobenius energy, that fraction chosen to meet the budget."""


@dataclass(frozen=True, kw_only=True)
class PAGCPConfig(ConfigBase):
    """PAGCP (Ye et al. 2023): performance-aware global channel pruning for multitask models (METHODS.md §2).

    Each unit (a convolution, or channels coupled through residual adds and concats) is pruned by the largest
    candidate width whose every task's calibration loss stays within 1 + delta_i of the running baseline and
    within tau x its original; delta_i = delta0 * lambda^i with prod(1 + delta0 lambda^i) = tau (lambda = 1
    without `exp`). tau is the user's promise: the shipped model's calibration loss of every task is at most tau
    (or that task's own `task_tau`) times the original's, checked again on the model that ships. With
    `macs_target`, the search varies delta0 only, in (0, tau - 1]; `max_tau` may let it loosen tau up to that
    ceiling. `rounds` alternates rounds of pruning under the bound with short fine-tunes ("auto": until the
    MACs target is met, at most `max_auto_rounds`).
    """

    delta0: float = 0.05         # allowed relative loss rise of each task for the first unit
    tau: float = 5.0             # bound on each task's final calibration loss, as a multiple of the original
    task_tau: tuple[tuple[str, float], ...] = ()  # per-task bounds (task name, tau) that replace tau for that task
    max_tau: float | None = None  # a MACs target may loosen tau up to this ceiling (reported as tau_used)
    zero_loss_atol: float = 1e-6  # a task whose reference loss is 0 may rise to this absolute loss, not a ratio
    top_p: float = 1.0           # share of units whose pruning is kept (smallest loss rise per MAC removed)
    exp: bool = False            # geometric schedule of delta (lambda from delta0, tau and the unit count)
    macs_target: float | None = None  # fraction of the original MACs to keep; None: follow delta0 and tau
    macs_tolerance: float = 0.02      # |achieved - target| allowed, as a fraction of the original MACs
    max_searches: int = 8             # searches the macs_target search may run per round and tau
    rounds: int | str = 1        # rounds of prune + short fine-tune; "auto": until macs_target is met
    max_auto_rounds: int = 5     # cap on rounds with rounds = "auto"
    round_epochs: int = 1        # fine-tuning epochs between rounds
    round_items: int | None = None  # training items each between-round fine-tune uses (None: the whole split)
    round_to: int = 1            # kept channel counts are multiples of this (hardware-friendly widths)
    ignore: tuple[str, ...] = ()  # module-name patterns never pruned (task heads are left alone anyway)
    step: float = 0.05           # ratio grid: step, 2 step, ... up to 0.95 (round_to > 1: every multiple instead)
    probe_ratio: float = 0.3     # share of a unit's channels removed to measure its MACs contribution
    calibration_items: int = 512  # fixed calibration subset the oracle evaluates on
    max_units: int | None = None  # search only the first N units in search order (a cap for cheap runs)
    saliency: str = "l1"         # l1 or l2 norm of each output channel's weights

    def __post_init__(self) -> None:
        _check_range("delta0", self.delta0, 0.0, 1e6, low_open=True)
        _check_range("tau", self.tau, 1.0, 1e12, low_open=True)
        object.__setattr__(self, "task_tau", _task_taus(self.task_tau))
        if self.max_tau is not None:
            _check_range("max_tau", self.max_tau, self.tau, 1e12)
        _check_range("zero_loss_atol", self.zero_loss_atol, 0.0, 1e6, low_open=True)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.macs_target is not None:
            _check_range("macs_target", self.macs_target, 0.0, 1.0, low_open=True, high_open=True)
        _check_range("macs_tolerance", self.macs_tolerance, 0.0, 0.5, low_open=True)
        _check_count("max_searches", self.max_searches, 1)
        self._check_rounds()
        _check_count("round_to", self.round_to, 1, "(1: any width)")
        _check_range("step", self.step, 0.0, 0.95, low_open=True)
        _check_range("probe_ratio", self.probe_ratio, 0.0, 1.0, low_open=True, high_open=True)
        _check_count("calibration_items", self.calibration_items, 1)
        if self.max_units is not None:
            _check_count("max_units", self.max_units, 1, "(or None: every unit)")
        if self.saliency not in ("l1", "l2"):
            raise UsageError(f"saliency = {self.saliency!r} is unknown; choose l1 or l2")
        validate_patterns(self.ignore, "--ignore")

    def _check_rounds(self) -> None:
        if self.rounds == "auto":
            if self.macs_target is None:
                raise UsageError("rounds = 'auto' runs until macs_target is met; give macs_target or a number of "
                                 "rounds")
        elif not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise UsageError(f"rounds = {self.rounds!r} must be a whole number >= 1 or 'auto'")
        _check_count("max_auto_rounds", self.max_auto_rounds, 1)
        _check_count("round_epochs", self.round_epochs, 0)
        if self.round_items is not None:
            _check_count("round_items", self.round_items, 1, "(or None: the whole training split)")

    def tau_of(self, task: str) -> float:
        """The bound of one task: its own task_tau, else tau."""
        return dict(self.task_tau).get(task, self.tau)
