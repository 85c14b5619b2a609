"""The one base class of every datamodule of the project."""

from __future__ import annotations

import lightning as L


class BaseDataModule(L.LightningDataModule):
    """Data served to one model: text windows for language-model phases, weights for weight phases.

    Subclasses load what they need lazily in ``prepare_data()`` / ``setup()`` and return one
    validation dataloader per entry of :attr:`dataset_names`.
    """

    def __init__(self, model_name_or_path: str | None = None, seed: int = 0) -> None:
        """
        Args:
            model_name_or_path: The model the data serves: a Hugging Face hub id or a local directory.
                Text datamodules load its tokenizer; weight datamodules load its weights.
            seed: Seed of every random draw made by the datamodule (sampling, shuffling).
        """
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.seed = int(seed)

    @property
    def dataset_names(self) -> list[str]:
        """One name per validation dataloader, in order (used as keys of logged metrics and results)."""
        return []
