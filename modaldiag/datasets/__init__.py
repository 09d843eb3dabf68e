"""Datasets: every loader yields ``(inputs: dict[str, Tensor], labels: LongTensor)``."""

from .adapt import AdaptedLoader, adapt_loader
from .base import DatasetSplits, MultimodalDataset, batch_loader
from .embedded import MFEAT_VIEWS, available, load
from .folder import AVFolderDataset, av_folder
from .synthetic import synthetic

__all__ = ["MultimodalDataset", "DatasetSplits", "batch_loader", "synthetic", "load", "available",
           "MFEAT_VIEWS", "AVFolderDataset", "av_folder", "adapt_loader", "AdaptedLoader"]
