"""Registry of data sets; every one is loaded into memory as tensors with seeded splits."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.errors import UsageError
from compress.tasks import Targets, Tasks, tasks_of

FASHION_MNIST_DIRS = (
    Path(os.environ.get("COMPRESS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")),
    Path.home() / ".cache" / "compress" / "fashion-mnist",
)
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
CALIBRATION_SIZE = 5000


@dataclass(frozen=True)
class TensorSplit:
    """Inputs (N, C, H, W) normalised float32 and integer labels (N,), or several targets (`Targets`)."""

    x: torch.Tensor
    y: torch.Tensor | Targets

    def __len__(self) -> int:
        return len(self.y)

    @property
    def tasks(self) -> Tasks:
        """The tasks the labels serve (one classification task for plain labels)."""
        return tasks_of(self.y)

    def subset(self, n: int) -> TensorSplit:
        """First n items (the splits are already shuffled with a fixed seed); lazily resized inputs stay lazy."""
        head = getattr(self.x, "head", None)
        return TensorSplit(head(n) if head is not None else self.x[:n], self.y[:n])


@dataclass(frozen=True)
class Splits:
    """A data set's fixed splits plus what a model needs to know about it."""

    name: str
    train: TensorSplit
    calibration: TensorSplit
    test: TensorSplit
    num_classes: int
    fingerprint: str

    @property
    def tasks(self) -> Tasks:
        return self.test.tasks

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.test.x.shape[1:])  # type: ignore[return-value]

    def with_channels(self, channels: int) -> Splits:
        """The same data with grayscale repeated to `channels` (for RGB architectures)."""
        have = self.input_shape[0]
        if have == channels:
            return self
        if have != 1:
            raise UsageError(f"data set {self.name!r} has {have} channels but the model expects {channels}; "
                             "pick a data set with matching channels")

        def widen(split: TensorSplit) -> TensorSplit:
            return TensorSplit(split.x.expand(-1, channels, -1, -1).contiguous(), split.y)

        return Splits(self.name, widen(self.train), widen(self.calibration), widen(self.test),
                      self.num_classes, self.fingerprint)


class Batches:
    """Iterates (x, y) mini-batches over a TensorSplit; shuffles with its own seeded generator per epoch."""

    def __init__(self, split: TensorSplit, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 augment: bool = False, shard: tuple[int, int] = (0, 1)) -> None:
        self.split, self.batch_size, self.shuffle, self.augment = split, batch_size, shuffle, augment
        self.seed, self.epoch = seed, 0
        self.rank, self.world = shard

    def __len__(self) -> int:
        per_rank = len(self.split) // self.world
        return (per_rank + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        n = len(self.split)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        per_rank = n // self.world
        order = order[self.rank * per_rank:(self.rank + 1) * per_rank]
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x, y = self.split.x[idx], self.split.y[idx]
            if self.augment and not isinstance(y, Targets):  # flips and shifts would move masks and positions
                x = _augment(x, gen)
            yield x, y


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (padding with the image minimum)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = 2
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip) as a NumPy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_fashion_mnist() -> Path:
    """The first directory holding all four Fashion-MNIST files, downloading with torchvision if possible."""
    for folder in FASHION_MNIST_DIRS:
        if all((folder / f).exists() for f in FASHION_MNIST_FILES.values()):
            return folder
    target = FASHION_MNIST_DIRS[1]
    try:  # on machines with internet, torchvision's usual download path
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(target.parent / "torchvision"), train=train, download=True)
        raw = target.parent / "torchvision" / "FashionMNIST" / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES.values():
            (target / name).write_bytes((raw / name).read_bytes())
        return target
    except Exception:  # noqa: BLE001 - any failure means "not available here"; the message says what to do
        raise UsageError(
            "Fashion-MNIST not found in /usr/share/datasets/fashion-mnist and could not be downloaded; "
            "install it with `apt-get install dataset-fashion-mnist` (or `make data` as root), "
            "or set COMPRESS_FASHION_MNIST to a folder with the four .gz files") from None


def _shuffled_split(x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...], seed: int) -> list[TensorSplit]:
    """Cut (x, y) into consecutive parts of a seeded permutation; the last part takes the rest."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for size in (*sizes, len(y) - sum(sizes)):
        idx = order[start:start + size]
        parts.append(TensorSplit(x[idx].contiguous(), y[idx].contiguous()))
        start += size
    return parts


def _normalise(images: np.ndarray, scale: float) -> torch.Tensor:
    """uint8/float images (N, H, W) or (N, C, H, W) to float32 with zero mean and unit variance overall."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / scale
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return (x - x.mean()) / x.std()


def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()


def fashion_mnist(seed: int = 0) -> Splits:
    """Fashion-MNIST: 55,000 train / 5,000 calibration (seeded, from the official train set) / 10,000 test."""
    folder = _find_fashion_mnist()
    raw = {key: _read_idx(folder / name) for key, name in FASHION_MNIST_FILES.items()}
    train_x = torch.from_numpy(raw["train_x"].copy()).float().div(255.0).unsqueeze(1)
    test_x = torch.from_numpy(raw["test_x"].copy()).float().div(255.0).unsqueeze(1)
    mean, std = 0.2860, 0.3530  # the training set's statistics: fixed so every split is normalised alike
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    calibration, train = _shuffled_split(train_x, torch.from_numpy(raw["train_y"].astype(np.int64)),
                                         (CALIBRATION_SIZE,), seed)
    test = TensorSplit(test_x, torch.from_numpy(raw["test_y"].astype(np.int64)))
    return Splits("fashion-mnist", train, calibration, test, 10,
                  _fingerprint(raw["train_x"], raw["train_y"], raw["test_x"], raw["test_y"]))


def digits(seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 digits: seeded 70% train / 10% calibration / 20% test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    x, y = _normalise(images, 16.0), torch.from_numpy(labels)
    n = len(y)
    calibration, test, train = _shuffled_split(x, y, (n // 10, n // 5), seed)
    return Splits("digits", train, calibration, test, 10, _fingerprint(images, labels))


def image_folder(path: str, seed: int = 0, size: int = 32) -> Splits:
    """A torchvision ImageFolder (one sub-folder per class), resized to size x size: 80/10/10 seeded."""
    from torchvision import datasets, transforms

    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"image folder {path!r} does not exist; give folder:PATH with one sub-folder per class")
    folder = datasets.ImageFolder(str(root), transform=transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor()]))
    if len(folder) < 10:
        raise UsageError(f"image folder {path!r} holds {len(folder)} images; it needs at least 10")
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    y = torch.tensor(folder.targets, dtype=torch.int64)
    x = (x - x.mean()) / x.std()
    n = len(y)
    calibration, test, train = _shuffled_split(x, y, (max(1, n // 10), max(1, n // 10)), seed)
    return Splits(f"folder:{path}", train, calibration, test, len(folder.classes),
                  _fingerprint(x.numpy(), y.numpy()))


DatasetLoader = Callable[[int], Splits]
DATASETS: dict[str, DatasetLoader] = {"fashion-mnist": fashion_mnist, "digits": digits}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make `fn(seed) -> Splits` loadable by name (other modules of compress.data register theirs)."""

    def wrap(fn: DatasetLoader) -> DatasetLoader:
        DATASETS[name] = fn
        return fn

    return wrap


def load_dataset(spec: str, seed: int = 0) -> Splits:
    """Resolve a data set spec: a registered name or `folder:PATH`."""
    if spec.startswith("folder:"):
        return image_folder(spec.removeprefix("folder:"), seed)
    if spec not in DATASETS:
        raise UsageError.unknown("data set", spec, DATASETS, choices=f"{', '.join(DATASETS)} or folder:PATH")
    return DATASETS[spec](seed)

