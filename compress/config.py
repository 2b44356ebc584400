"""Frozen, keyword-only configs, validated on construction, round-tripping through dicts (recipes, reports).

The user-facing fields carry `dataclasses.field(metadata=...)` from which the CLI generates its options
(compress/cli.py): "help" (the option's help), "flag" (the option's name when it is not --field-name), "hidden"
(an internal knob: no option; recipes still set it), "choices" (the allowed words, checked in `__post_init__`),
"cli_default" (the option's default when it differs from the field's), "per_name" (the option also takes
NAME=VALUE items, which fill the named field) and "replaces" (a field that this one replaces: giving both options
is refused). A config's `cli_panel` names its group of options in `--help` (default: the method's name).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from compress.errors import UsageError, closest_match

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

    cli_panel: ClassVar[str] = ""  # the --help panel of the config's options; "": the method's name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown key(s) {_with_suggestions(unknown, known)} for {cls.__name__}; "
                             f"allowed: {', '.join(sorted(known))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _with_suggestions(unknown: list[str], known: Iterable[str]) -> str:
    """`'min_treshold' (did you mean min_threshold?), 'foo'`: each unknown key with the closest known one."""
    known = list(known)
    parts = []
    for key in unknown:
        match = closest_match(str(key), known)
        parts.append(f"{str(key)!r} (did you mean {match}?)" if match else repr(str(key)))
    return ", ".join(parts)


def _check_choice(config: ConfigBase, name: str) -> None:
    """Raise a UsageError unless field `name` holds one of the words of its metadata "choices"."""
    choices = next(f.metadata["choices"] for f in dataclasses.fields(config) if f.name == name)
    value = getattr(config, name)
    if value not in choices:
        raise UsageError(f"{name} = {value!r} is unknown; choose {' or '.join(choices)}")


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

    cli_panel: ClassVar[str] = "GlobalMP"

    sparsity: float = field(default=0.9, metadata={"help": "Fraction of conv/linear weights to prune."})
    min_threshold: float = field(default=0.0, metadata={  # the paper's MT
        "help": "Floor: percent of all prunable weights every layer keeps (the paper's MT, e.g. 0.05)."})
    min_keep: float = field(default=0.0, metadata={"help": "Floor: fraction of its own weights every layer keeps."})
    # module-name patterns to prune; empty: every Conv/Linear
    include: tuple[str, ...] = field(default=(), metadata={"help": "Prune only modules matching (glob or re:REGEX)."})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "Never prune modules matching (glob or re:REGEX)."})
    schedule: str = field(default="oneshot", metadata={"help": "oneshot, or gradual (cubic, during fine-tuning).",
                                                       "choices": ("oneshot", "gradual")})
    initial_sparsity: float = field(default=0.0, metadata={"hidden": True})  # gradual: sparsity at the first step

    def __post_init__(self) -> None:
        _check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        _check_range("min_threshold", self.min_threshold, 0.0, 100.0)
        _check_range("min_keep", self.min_keep, 0.0, 1.0)
        _check_range("initial_sparsity", self.initial_sparsity, 0.0, self.sparsity)
        _check_choice(self, "schedule")
        validate_patterns(self.include, "--include")
        validate_patterns(self.exclude, "--exclude")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(ConfigBase):
    """Fine-tuning (and training) recipe: the paper's cosine schedule, label smoothing, optional distillation."""

    cli_panel: ClassVar[str] = "Fine-tuning"

    # `prune` fine-tunes only when asked: its --finetune-epochs defaults to 0
    epochs: int = field(default=1, metadata={"help": "Epochs of fine-tuning after pruning.",
                                             "flag": "--finetune-epochs", "cli_default": 0})
    optimizer: str = field(default="sgd", metadata={"help": "sgd or adamw.", "choices": ("sgd", "adamw")})
    lr: float = field(default=0.03, metadata={"help": "Peak learning rate (cosine schedule)."})
    momentum: float = field(default=0.9, metadata={"hidden": True})
    weight_decay: float = field(default=5e-4, metadata={"hidden": True})
    label_smoothing: float = field(default=0.1, metadata={"hidden": True})
    batch_size: int = field(default=128, metadata={"hidden": True})
    augment: bool = field(default=True, metadata={"hidden": True})
    distill: bool = field(default=False, metadata={"help": "Distil from the uncompressed model while fine-tuning."})
    distill_temperature: float = field(default=4.0, metadata={"hidden": True})
    distill_alpha: float = field(default=0.5, metadata={"hidden": True})  # weight of the distillation term
    warmup_steps: int = field(default=0, metadata={"hidden": True})

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise UsageError(f"epochs = {self.epochs} must be >= 0")
        _check_choice(self, "optimizer")
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
        raise UsageError(f"recipe {path!r} has unknown key(s) {_with_suggestions(unknown, RECIPE_KEYS)}; "
                         f"allowed: {', '.join(RECIPE_KEYS)}")
    return recipe


def _check_budget(cfg: Any) -> None:
    """The keep ratios (of all parameters, of MACs, of latency) lie in (0, 1]; the latency settings are sane."""
    for name in ("keep", "macs_keep", "latency_keep"):
        if getattr(cfg, name) is not None:
            _check_range(name, getattr(cfg, name), 0.0, 1.0, low_open=True)
    if cfg.backend not in LATENCY_BACKENDS:
        raise UsageError(f"backend = {cfg.backend!r} is not a latency backend; choose one of "
                         f"{', '.join(LATENCY_BACKENDS)}")
    if cfg.latency_batch < 1 or cfg.rank_step < 1:
        raise UsageError(f"latency_batch = {cfg.latency_batch} and rank_step = {cfg.rank_step} must be >= 1")
    _check_range("dense_margin", cfg.dense_margin, 0.0, 1.0)
    if not getattr(cfg, "priced", True) and cfg.latency_keep is not None:
        raise UsageError(f"latency_keep = {cfg.latency_keep} prices every layer on the backend, which priced = false "
                         "switches off; drop --no-priced (or --latency-keep)")


NO_SLOWER = 1.0  # the latency budget a priced run keeps when none is asked for: never slower than the original


def latency_keep_of(cfg: Any) -> float | None:
    """The latency budget of a low-rank config: `latency_keep`, else NO_SLOWER when it is priced (the default),
    else none."""
    if cfg.latency_keep is not None:
        return cfg.latency_keep
    return NO_SLOWER if getattr(cfg, "priced", False) else None


def params_keep(cfg: Any) -> float | None:
    """The fraction of all parameters a low-rank config keeps: `keep`, else 0.5 when no other budget is given."""
    if cfg.keep is not None:
        return cfg.keep
    return 0.5 if cfg.macs_keep is None and cfg.latency_keep is None else None


# the budget and the patterns of the low-rank methods (ALDS, SVD)
_KEEP = {"help": "Fraction of all parameters to keep (norms, biases, untouched layers included); default 0.5 "
                 "unless --macs-keep or --latency-keep is given."}
_MACS_KEEP = {"help": "Fraction of MACs to keep instead of --keep.", "replaces": "keep"}
LATENCY_ROUND_TO = 8
LATENCY_BACKENDS = ("onnxruntime-cpu", "pytorch-cpu", "pytorch-cuda", "mobile-proxy")
_LATENCY_KEEP = {"help": "Fraction of the original's latency on --backend to keep, each layer priced there (with "
                         "--keep or --macs-keep too: the first to bind wins)."}
_BACKEND = {"help": "Backend whose measured layer times price each choice (--latency-keep, --latency-target).",
            "choices": LATENCY_BACKENDS}
_LATENCY_BATCH = {"help": "Batch size the layers are priced at (--latency-keep, --latency-target)."}
_RANK_STEP = {"help": "Priced (the default, or --latency-keep): ranks (and k x rank) are multiples of this, "
                      "which blocked kernels run fast."}
_DENSE_MARGIN = {"help": "Priced (the default, or --latency-keep): a layer stays dense unless its best low-rank "
                         "form saves this fraction of its time."}
_PRICED = {"help": "Price each layer's choices on --backend (ranks in steps of --rank-step, fast shapes only) and "
                    "ship no slower than the original even without --latency-keep; --no-priced: the paper's "
                    "allocation (or the textbook baseline) by weights alone (every rank; the model may run slower "
                    "than the original)."}
_DECOMPOSE = {"help": "Decompose only modules matching (glob or re:REGEX)."}
_LEAVE = {"help": "Never decompose modules matching (glob or re:REGEX)."}


@dataclass(frozen=True, kw_only=True)
class ALDSConfig(ConfigBase):
    """ALDS (Liebenwein et al. 2021): per-layer rank j and channel groups k minimising the worst relative error.

    The budget is `keep` x all parameters of the network (0.5 when no budget is given), or `macs_keep` x its MACs
    when that is given (then `keep` is not used), and/or `latency_keep` x the original's measured latency on
    `backend` at `latency_batch`, each layer's choices priced there (ranks in steps of `rank_step`, a layer kept
    dense unless it saves `dense_margin` of its time); with two budgets the first to bind wins. `priced` (the
    default) prices the choices even without `latency_keep`, whose budget is then the original's latency (never
    slower); `priced = False` is the paper's allocation by weights alone. The seeded k search uses the run's seed;
    priced and given data, its k's are weighed against plain low rank on calibration losses (`compare_plain`).
    """

    cli_panel: ClassVar[str] = "ALDS / SVD"

    keep: float | None = field(default=None, metadata=_KEEP)  # fraction of ALL parameters kept (params_keep)
    macs_keep: float | None = field(default=None, metadata=_MACS_KEEP)  # given: a MACs budget, not parameters
    latency_keep: float | None = field(default=None, metadata=_LATENCY_KEEP)
    priced: bool = field(default=True, metadata=_PRICED)
    backend: str = field(default="onnxruntime-cpu", metadata=_BACKEND)
    latency_batch: int = field(default=1, metadata=_LATENCY_BATCH)
    rank_step: int = field(default=8, metadata=_RANK_STEP)
    dense_margin: float = field(default=0.1, metadata=_DENSE_MARGIN)
    # candidate k per layer (used where k divides the input channels); empty: all
    groups: tuple[int, ...] = field(default=(), metadata={
        "help": "Channel groups k the search may give a layer (repeat the option; default: every divisor). "
                "--groups 1: plain low rank, no grouped layers."})
    # priced: the searched k's minimise the worst layer's error bound, which on some networks (mobilenet_v2 in
    # reports/speed.md) costs far more accuracy than plain low rank at the same budget; the data decide instead
    compare_plain: bool = field(default=True, metadata={
        "help": "Priced, with data: also allocate plain low rank (k = 1) under the same budgets and ship the one "
                "predicted faster unless the other's calibration loss is lower beyond paired noise "
                "(--no-compare-plain: the searched k's, as the paper)."})
    # k only where each group keeps at least this many input channels: narrow groups cut MACs but run slowly on
    # dense runtimes (ONNX Runtime, mobile); 1 allows every divisor, as the paper does
    min_group_channels: int = field(default=1, metadata={
        "help": "Input channels each group keeps at least (e.g. 16 for speed on dense runtimes; 1: any k)."})
    # starting points of the k search: k nearest 3, 5, 7, 9, then random divisors
    seeds: int = field(default=15, metadata={"hidden": True})
    rounds: int = field(default=4, metadata={"hidden": True})  # k re-assignment rounds per seed
    # module-name patterns to decompose; empty: every Conv2d/Linear
    include: tuple[str, ...] = field(default=(), metadata=_DECOMPOSE)
    exclude: tuple[str, ...] = field(default=(), metadata=_LEAVE)

    def __post_init__(self) -> None:
        _check_budget(self)
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
    """Truncated SVD baseline (k = 1): one relative rank for every layer, chosen to meet the budget.

    Budgets as ALDS's: `keep`, `macs_keep` and/or `latency_keep`, and `priced` (the default: the choices priced on
    `backend`, never slower than the original) or `priced = False` (the textbook baseline by weights alone: every
    rank, however it runs).
    """

    cli_panel: ClassVar[str] = "ALDS / SVD"

    keep: float | None = field(default=None, metadata=_KEEP)
    macs_keep: float | None = field(default=None, metadata=_MACS_KEEP)
    latency_keep: float | None = field(default=None, metadata=_LATENCY_KEEP)
    # as ALDS: a baseline compared at the same budget should run on the same backend by the same rules
    priced: bool = field(default=True, metadata=_PRICED)
    backend: str = field(default="onnxruntime-cpu", metadata=_BACKEND)
    latency_batch: int = field(default=1, metadata=_LATENCY_BATCH)
    rank_step: int = field(default=8, metadata=_RANK_STEP)
    dense_margin: float = field(default=0.1, metadata=_DENSE_MARGIN)
    include: tuple[str, ...] = field(default=(), metadata=_DECOMPOSE)
    exclude: tuple[str, ...] = field(default=(), metadata=_LEAVE)

    def __post_init__(self) -> None:
        _check_budget(self)
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

    cli_panel: ClassVar[str] = "PAGCP"

    delta0: float = field(default=0.05, metadata={  # allowed relative loss rise of each task for the first unit
        "help": "Allowed relative rise of each task's calibration loss for the first unit."})
    # bound on each task's final calibration loss, as a multiple of the original; --tau NAME=TAU fills task_tau
    tau: float = field(default=5.0, metadata={"per_name": "task_tau", "help": (
        "Bound on each task's calibration loss in the model that ships, as a multiple of the original; NAME=TAU "
        "(repeat) bounds one task, e.g. position=2.")})
    # per-task bounds (task name, tau) that replace tau for that task
    task_tau: tuple[tuple[str, float], ...] = field(default=(), metadata={"hidden": True})
    max_tau: float | None = field(default=None, metadata={  # reported as tau_used
        "help": "A --macs-target may loosen tau up to this ceiling (reported as tau_used); default: never."})
    zero_loss_atol: float = field(default=1e-6, metadata={
        "help": "The loss a task with zero original loss may reach (an absolute bound instead of a ratio)."})
    top_p: float = field(default=1.0, metadata={
        "help": "Share of units whose pruning is kept (smallest loss rise per MAC removed)."})
    exp: bool = field(default=False, metadata={
        "help": "Geometric schedule of the allowed rise (lambda from delta0, tau and the unit count)."})
    macs_target: float | None = field(default=None, metadata={  # None: follow delta0 and tau
        "help": "Fraction of the original MACs to keep; the search varies delta0 (never tau) to meet it, else "
                "exits 6."})
    macs_tolerance: float = field(default=0.02, metadata={
        "help": "|kept - target| allowed, as a fraction of the original MACs (or latency with --latency-target)."})
    latency_target: float | None = field(default=None, metadata={  # a target in predicted ms instead of MACs
        "replaces": "macs_target",
        "help": "Fraction of the original's latency on --backend to keep, each unit's share priced there in "
                "milliseconds; widths snap to multiples of 8 (unless --round-to says otherwise) that the table "
                "prices faster than every wider one; else like --macs-target."})
    backend: str = field(default="onnxruntime-cpu", metadata=_BACKEND)
    latency_batch: int = field(default=1, metadata=_LATENCY_BATCH)
    # searches the macs_target search may run per round and tau
    max_searches: int = field(default=8, metadata={"hidden": True})
    rounds: int | str = field(default=1, metadata={"choices": ("auto",), "help": (
        "Rounds of pruning under the bound with a short fine-tune between them; auto: until --macs-target is met.")})
    max_auto_rounds: int = field(default=5, metadata={"hidden": True})  # cap on rounds with rounds = "auto"
    round_epochs: int = field(default=1, metadata={"help": "Fine-tuning epochs between rounds."})
    round_items: int | None = field(default=None, metadata={  # None: the whole split
        "help": "Training items each between-round fine-tune uses (default: all)."})
    round_to: int = field(default=1, metadata={  # hardware-friendly widths
        "help": "Kept channel counts are multiples of this (units narrower than twice it are left alone)."})
    ignore: tuple[str, ...] = field(default=(), metadata={"help": (
        "Never prune the output channels of modules matching (glob or re:REGEX); task heads are left alone "
        "anyway.")})
    # ratio grid: step, 2 step, ... up to 0.95 (round_to > 1: every multiple instead)
    step: float = field(default=0.05, metadata={"hidden": True})
    # share of a unit's channels removed to measure its MACs contribution
    probe_ratio: float = field(default=0.3, metadata={"hidden": True})
    calibration_items: int = field(default=512, metadata={"hidden": True})  # fixed subset the oracle evaluates on
    # search only the first N units in search order (a cap for cheap runs)
    max_units: int | None = field(default=None, metadata={"hidden": True})
    # l1 or l2 norm of each output channel's weights
    saliency: str = field(default="l1", metadata={"hidden": True, "choices": ("l1", "l2")})

    def __post_init__(self) -> None:
        _check_range("delta0", self.delta0, 0.0, 1e6, low_open=True)
        _check_range("tau", self.tau, 1.0, 1e12, low_open=True)
        object.__setattr__(self, "task_tau", _task_taus(self.task_tau))
        if self.max_tau is not None:
            _check_range("max_tau", self.max_tau, self.tau, 1e12)
        _check_range("zero_loss_atol", self.zero_loss_atol, 0.0, 1e6, low_open=True)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        for name in ("macs_target", "latency_target"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0.0, 1.0, low_open=True, high_open=True)
        if self.macs_target is not None and self.latency_target is not None:
            raise UsageError("give macs_target or latency_target, not both")
        if self.backend not in LATENCY_BACKENDS or self.latency_batch < 1:
            raise UsageError(f"backend = {self.backend!r} must be one of {', '.join(LATENCY_BACKENDS)} and "
                             f"latency_batch = {self.latency_batch} >= 1")
        _check_range("macs_tolerance", self.macs_tolerance, 0.0, 0.5, low_open=True)
        _check_count("max_searches", self.max_searches, 1)
        self._check_rounds()
        _check_count("round_to", self.round_to, 1, "(1: any width)")
        _check_range("step", self.step, 0.0, 0.95, low_open=True)
        _check_range("probe_ratio", self.probe_ratio, 0.0, 1.0, low_open=True, high_open=True)
        _check_count("calibration_items", self.calibration_items, 1)
        if self.max_units is not None:
            _check_count("max_units", self.max_units, 1, "(or None: every unit)")
        _check_choice(self, "saliency")
        validate_patterns(self.ignore, "--ignore")

    @property
    def target(self) -> float | None:
        """The fraction to keep, of MACs or (with latency_target) of predicted latency; None: no target."""
        return self.latency_target if self.latency_target is not None else self.macs_target

    @property
    def width_multiple(self) -> int:
        """Kept widths are multiples of this: round_to, or 8 (what blocked CPU kernels run fast) when a latency
        target leaves round_to at 1."""
        return LATENCY_ROUND_TO if self.latency_target is not None and self.round_to == 1 else self.round_to

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
