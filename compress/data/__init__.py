"""Data sets with fixed, seeded train / calibration / test splits."""

from compress.data.datasets import DATASETS, Batches, Splits, TensorSplit, load_dataset

__all__ = ["DATASETS", "Batches", "Splits", "TensorSplit", "load_dataset"]
