"""Data layer: sources -> preprocessing/splits -> client partition -> examples -> batches."""

from fellrec_jax.data.prepare import PreparedData, prepare_dataset
from fellrec_jax.data.sources import DataError, Dataset

__all__ = ["DataError", "Dataset", "PreparedData", "prepare_dataset"]
