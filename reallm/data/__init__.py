"""LightningDataModules, all deriving from :class:`BaseDataModule`."""

from reallm.data.base import BaseDataModule
from reallm.data.patch_steps import PatchDataModule
from reallm.data.text import TextDataModule
from reallm.data.weights import WeightDataModule

__all__ = ["BaseDataModule", "PatchDataModule", "TextDataModule", "WeightDataModule"]
