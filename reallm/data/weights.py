"""Weight matrices as data: phase 1 iterates over the linear layers of a model.

Each item is one matrix {"name": str, "weight": Tensor (p, q) in nn.Linear layout}; with several
devices, Lightning's distributed sampler gives each device its share of the matrices. With
`patch_size`, `patches(name)` also cuts a matrix into P × P patches for the autoencoder.
"""

from __future__ import annotations

import re

import torch
from torch.utils.data import DataLoader, Dataset

from reallm.core.errors import UserError
from reallm.core.hf_models import find_decoder_blocks, is_linear, linear_weight, load_hf_model
from reallm.data.base import BaseDataModule
from reallm.ops.patches import matrix_to_patches


class _Matrices(Dataset):
    def __init__(self, owner: WeightDataModule) -> None:
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner.names)

    def __getitem__(self, i: int) -> dict:
        name = self.owner.names[i]
        return {"name": name, "index": i, "weight": self.owner.weight(name)}


class WeightDataModule(BaseDataModule):
    """Streams the weight matrices of the selected linear layers of a model (phase 1).

    The base model is loaded once on CPU (`self.model`); the compression phase replaces its
    layers in place and saves it, so no second copy of the model is ever made.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        layers: str | None = None,
        dtype: str | None = "auto",
        patch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            model_name_or_path: the model whose weights are compressed (hub id or directory).
            layers: a regular expression on layer names restricting the matrices (default: every
                linear inside the decoder blocks).
            dtype: dtype the base model is loaded in: "auto" (the dtype it is stored in, the default: its
                embeddings, norms, head and biases are saved in that dtype), "float32", "bfloat16".
                Compression itself always works in fp32, one matrix at a time.
            patch_size: P for the autoencoder phase (matrices are cut into P × P patches).
            seed: unused by this datamodule except for reproducible shuffling (kept for the base).
        """
        super().__init__(model_name_or_path, seed)
        self.layers = layers
        self.dtype = dtype
        self.patch_size = patch_size
        self.model: torch.nn.Module | None = None
        self.names: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if self.model is not None:
            return

        if not self.model_name_or_path:
            raise UserError("the weight datamodule needs a model: pass --model.init_args.model_name_or_path")
        self.model = load_hf_model(self.model_name_or_path, self.dtype)
        prefix, _ = find_decoder_blocks(self.model)
        pattern = re.compile(self.layers) if self.layers else None
        self.names = [n for n, m in self.model.named_modules()
                      if is_linear(m) and n.startswith(prefix + ".") and (pattern is None or pattern.search(n))]
        if not self.names:
            raise UserError(f"no linear layer matches --data.init_args.layers={self.layers!r}")

    def weight(self, name: str) -> torch.Tensor:
        """The current weight of a layer in nn.Linear layout (p, q)."""

        return linear_weight(self.model.get_submodule(name)).detach()

    def patches(self, name: str) -> torch.Tensor:

        if not self.patch_size:
            raise ValueError("patch_size is not set")
        return matrix_to_patches(self.weight(name).float(), self.patch_size)[0]

    @property
    def dataset_names(self) -> list[str]:
        return ["weights"]

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: one matrix per step, no collation (matrices differ in shape)
        return DataLoader(_Matrices(self), batch_size=None, shuffle=False)
