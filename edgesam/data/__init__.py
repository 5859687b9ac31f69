"""Data formats: the embedded benchmark, SA-1B reading, WebDataset shards, SAM transforms."""

from edgesam.data.shards import Sample, SampleDataset, iter_samples, list_shards
from edgesam.data.transforms import preprocess, valid_mask

__all__ = ["Sample", "SampleDataset", "iter_samples", "list_shards", "preprocess", "valid_mask"]
