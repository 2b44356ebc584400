"""Data sets with fixed, seeded train / calibration / test splits."""

from compress.data import multitask  # noqa: F401  (registers the canvas data sets)
from compress.data.datasets import DATASETS, Batches, Splits, TensorSplit, load_dataset, register_dataset

__all__ = ["DATASETS", "Batches", "Splits", "TensorSplit", "load_dataset", "register_dataset"]
