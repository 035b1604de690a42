"""Datasets: ``DataConfig`` -> ``build_dataset`` / ``build_loaders`` over a small registry of datasets."""

from gmpq.data.datasets import (
    DataConfig,
    SubsetDataset,
    balanced_subset_indices,
    build_dataset,
    build_loaders,
    check_dataset_for_model,
    check_labels,
    list_datasets,
    register_dataset,
)
from gmpq.data.stats import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DataConfig", "SubsetDataset",
           "balanced_subset_indices", "build_dataset", "build_loaders", "check_dataset_for_model", "check_labels",
           "list_datasets", "register_dataset"]
