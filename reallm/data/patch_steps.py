"""The autoencoder phase's data: the weights of a model, and an epoch of step indices.

`PatchDataModule` is the `WeightDataModule` whose training loader yields the step indices 0 .. n−1 of
one epoch: the autoencoder phase cuts the matrices into patches itself and keeps them on its device
(every device runs all steps over its own groups of matrices), and tells the datamodule n, its number
of steps per epoch, in its `setup` (:meth:`PatchDataModule.set_steps_per_epoch`).
"""

from __future__ import annotations

from torch.utils.data import DataLoader, IterableDataset

from reallm.data.weights import WeightDataModule

__all__ = ["PatchDataModule"]


class _Steps(IterableDataset):
    """0 .. n−1, n = the datamodule's steps per epoch (read when the loader is iterated)."""

    def __init__(self, dm: PatchDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.steps_per_epoch

    def __iter__(self):
        return iter(range(self.dm.steps_per_epoch))


class PatchDataModule(WeightDataModule):
    """The weights of a model (as `WeightDataModule`) for the autoencoder phase: the phase cuts them
    into patches and keeps them on its device; the training loader yields the step indices of one
    epoch (an IterableDataset: every device runs all steps over its own groups of matrices)."""

    steps_per_epoch: int = 1  # set by the phase (set_steps_per_epoch) before the loader is iterated

    def set_steps_per_epoch(self, n: int) -> None:
        """Told by the phase: the number of optimiser steps of one epoch (the same on every device)."""
        if n < 1:
            raise ValueError(f"steps per epoch must be >= 1, got {n}")
        self.steps_per_epoch = int(n)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self), batch_size=None)
