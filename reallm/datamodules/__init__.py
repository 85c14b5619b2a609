"""LightningDataModules, all deriving from :class:`BaseDataModule`."""

from reallm.datamodules.base import BaseDataModule
from reallm.datamodules.patches import PatchDataModule
from reallm.datamodules.text import TextDataModule
from reallm.datamodules.weights import WeightDataModule

__all__ = ["BaseDataModule", "PatchDataModule", "TextDataModule", "WeightDataModule"]
