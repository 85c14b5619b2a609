"""Phase 1 with the patch autoencoder (method.md §4), plus the adaptive per-matrix choice under a budget.

`AutoencoderPhase` extends the data-free `CompressPhase`:

1. ``setup``: a budget that no choice can meet is refused at once (`reallm.model.candidates.check_budget`: every
   candidate's bits follow from its config and its matrix's shape), before calibration or any encoding. Then
   every matrix × every candidate configuration is prepared. Candidates without a decoder
   (VQ, NF, ...) are compressed at once (data-free; a model-wide VQ codebook is fitted per candidate).
   Autoencoder candidates are grouped (matrices sharing one decoder and latent codebook, ``share`` in
   the config's ``options``), groups of identical networks are stacked
   (`reallm.formats.autoencoder.recipe.AEStack`, vmapped), and the groups are divided among the devices
   (longest-processing-time first).
2. ``fit``: a Lightning epoch is an autoencoder epoch; a step trains every stack of this device on one
   mini-batch of patches per group (Adam, cosine schedule with warm-up, MSE weighted so that it is the
   relative squared Frobenius error of W; latent VQ with straight-through gradients; QAT of the
   decoder at b_φ bits; a final stage with frozen codes). The reconstruction error is logged.
3. ``on_train_end``: each device exports its groups into containers (latent codes, latent codebook,
   bit-packed decoder) and measures each matrix's error by decoding the stored container; rank 0 then
   picks one candidate per matrix (`reallm.model.candidates.select`: exact MILP under the global budget, the
   trivial choice when there is one candidate; each shared decoder / codebook charged to the matrices
   that use it), writes the chosen containers to ``partial/`` and lets `CompressPhase` assemble the model,
   save the checkpoint and write ``results.json`` (with the choice and its reason for every matrix).

Everything a device computes is written to ``run_dir/partial/cand/<label>/`` (a `reallm.weight.store.WeightStore`
per candidate) as soon as it is done, so an interrupted run restarted with the same ``--run_dir`` skips the
candidates and groups already finished (a group interrupted mid-training is retrained from the start).

The data is a `reallm.data.PatchDataModule`, told the number of steps of an epoch in ``setup``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reallm.core import schedules
from reallm.core.errors import UserError
from reallm.core.hf_models import find_decoder_blocks
from reallm.data.patch_steps import PatchDataModule
from reallm.formats.autoencoder import codec as ae_format
from reallm.formats.autoencoder import recipe as ae_recipe
from reallm.model.adaptive import AdaptiveConfig
from reallm.model.candidates import candidate_configs, check_budget, select
from reallm.model.surgery import fit_shared_tensors
from reallm.ops.patches import patch_grid
from reallm.phases import calibration as calib
from reallm.phases.autoencoder_matrices import build_container, prepare_matrix
from reallm.phases.compress import CompressPhase
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.pipeline import compress_weight
from reallm.weight.store import WeightStore

__all__ = ["AutoencoderPhase"]


class AutoencoderPhase(CompressPhase):
    """Phase 1 with the patch autoencoder and the adaptive per-matrix choice (method.md §4)."""

    phase = "compress"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        compression: CompressionConfig | None = None,
        layer_configs: dict[str, CompressionConfig | None] | None = None,
        adaptive: AdaptiveConfig | None = None,
        schedule: ae_recipe.TrainSchedule | None = None,
        max_groups_per_stack: int = 64,
        patches_on_device: bool | None = None,
        method: str = "custom",
        run_dir: str | None = None,
        checkpoint: str | None = None,
        seed: int = 0,
        calibration: calib.CalibrationConfig | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: the base model (hub id or local directory).
            compression: the base compression config (quantizer "autoencoder" trains a decoder; any
                other quantizer is compressed data-free, as in CompressPhase).
            layer_configs: per-layer overrides of the base config (fnmatch pattern → config, None
                leaves the layer uncompressed).
            adaptive: choose one candidate configuration per matrix under a global bit budget
                (None: every matrix takes the base config).
            schedule: the autoencoder training recipe (its ``epochs`` is replaced by
                ``trainer.max_epochs`` when that is set).
            max_groups_per_stack: at most this many decoders are trained in one vmapped stack.
            patches_on_device: keep every patch on the training device (None: when they take
                less than 2 GiB), else on the CPU with one mini-batch moved per step.
            method: name of the method preset, for results.json.
            run_dir: the run directory (set by --run_dir).
            checkpoint: unused (a fresh compression starts from the base model).
            seed: seed of every random choice (overrides compression.seed when non-zero).
            calibration: calibration-aware phase 1 (None: data-free): the data-free candidates are encoded
                under the output-error weights (VQ), every candidate's relative output error is measured, and
                the adaptive choice minimises the output error instead of the weight error. The autoencoders
                themselves are trained on the weight error either way.
        """
        super().__init__(model_name_or_path, compression, layer_configs, method, run_dir, checkpoint, seed,
                         calibration)
        self.adaptive = adaptive
        if adaptive is not None and adaptive.error == "output" and calibration is None:
            raise UserError("adaptive.error: output needs calibration-aware phase 1 "
                            "(--model.init_args.calibration.path)")
        self.schedule = schedule or ae_recipe.TrainSchedule()
        self.max_groups_per_stack = max_groups_per_stack
        self.patches_on_device = patches_on_device
        self.automatic_optimization = False
        # DDP needs one registered parameter; the stacks are kept outside the module's parameters
        # because each device trains different decoders (no gradient is ever synchronised).
        self._ddp_anchor = nn.Parameter(torch.zeros(1))
        self._stacks: list[tuple[ae_recipe.AEStack, ae_recipe.GroupData, list[tuple[str, str]]]] = []
        self._prepared: dict[tuple[str, str], ae_recipe.PreparedMatrix] = {}
        self._steps = 1
        self._epoch_losses: list[torch.Tensor] = []
        self._summary: dict[str, Any] = {}
        self._extras: dict[str, dict[str, Any]] = {}
        self.save_hyperparameters(ignore=["run_dir"])

    # -- candidates ---------------------------------------------------------------------------
    def candidates_for(self, name: str) -> dict[str, CompressionConfig]:
        """label → configuration of every candidate of layer `name` (see `reallm.model.candidates`)."""
        return candidate_configs(self.config_for(name), self.adaptive)

    def evaluated(self, label: str) -> WeightStore:
        """The stored results of candidate `label` (`run_dir/partial/cand/<label>/`, by matrix index)."""
        return WeightStore(self.partial_dir / "cand" / label)

    # -- setup: data-free candidates, autoencoder groups ----------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        dm = self.trainer.datamodule
        if not isinstance(dm, PatchDataModule):
            raise UserError(f"AutoencoderPhase needs --data reallm.data.PatchDataModule (got "
                            f"{type(dm).__name__}): its training loader yields the phase's steps")
        rank, world = self.global_rank, self.trainer.world_size
        device = self.trainer.strategy.root_device
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 \
            else self.schedule.epochs
        self.sched = dataclasses.replace(self.schedule, epochs=int(epochs), seed=self.compression.seed)
        self._targets = [(i, n) for i, n in enumerate(dm.names) if self.config_for(n) is not None]
        if not self._targets:
            raise UserError("no layer selected: every layer config resolved to None")
        self._cands = {n: self.candidates_for(n) for _, n in self._targets}
        try:
            self._blocks_prefix = find_decoder_blocks(dm.model)[0]
        except ValueError:
            self._blocks_prefix = None
        # an impossible budget is refused before any work: its bits follow from the configs and shapes alone
        check_budget([(n, tuple(dm.weight(n).shape), self._cands[n]) for _, n in self._targets], self.adaptive,
                     self._blocks_prefix)

        # calibration statistics (None: data-free), before any candidate
        moments = self.input_moments()
        # data-free candidates: shared codebooks (identical on every rank), then this rank's share
        plain = [(i, n, lab, c) for i, n in self._targets for lab, c in self._cands[n].items()
                 if c.quantizer != "autoencoder"]
        by_label: dict[str, list] = {}
        for _, n, lab, c in plain:
            by_label.setdefault(lab, []).append((n, dm.model.get_submodule(n), c))
        shared = {lab: fit_shared_tensors(t, device=device, progress=False, moments=moments)
                  for lab, t in by_label.items()}
        for k, (i, n, lab, c) in enumerate(plain):
            if k % world != rank or self.evaluated(lab).load(i, n, self.store_key(c)) is not None:
                continue
            W = dm.weight(n).to(device)
            tensors, numel = shared[lab].get(c.key(), (None, None))
            weight = compress_weight(W, c, name=n, shared=tensors, shared_numel=numel,
                                     moments=None if moments is None else moments[n].to(device))
            self._save_candidate(lab, i, n, W, weight, c)

        # autoencoder candidates: groups → ranks → stacks
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for i, n in self._targets:
            for lab, c in self._cands[n].items():
                if c.quantizer == "autoencoder":
                    groups.setdefault((lab, ae_recipe.group_key(c, n, self._blocks_prefix)), []).append((i, n))
        cost, patches = {}, {}
        for gid, members in groups.items():
            c = self._cands[members[0][1]][gid[0]]
            spec = ae_format.ae_spec(c)
            patches[gid] = sum(math.prod(patch_grid(tuple(dm.weight(n).shape), spec.patch_hw)) for _, n in members)
            cost[gid] = patches[gid] * spec.decoder_params_count()
        bs = self.sched.batch_size
        self._steps = max([1] + [-(-patches[g] // bs) for g in groups])
        dm.set_steps_per_epoch(self._steps)
        owner = ae_recipe.assign_groups(cost, world)
        self._group_info = {"groups": len(groups), "owner": {f"{g[0]}|{g[1]}": r for g, r in owner.items()}}
        mine: dict[str, list[tuple[str, str]]] = {}
        for gid, members in groups.items():
            if owner[gid] != rank:
                continue
            c = self._cands[members[0][1]][gid[0]]
            done = all(self.evaluated(gid[0]).load(i, n, self.store_key(c)) is not None for i, n in members)
            if not done:
                mine.setdefault(ae_recipe.stack_key(c), []).append(gid)
        self._stacks = []
        for skey in sorted(mine):
            gids = sorted(mine[skey])
            for s in range(0, len(gids), self.max_groups_per_stack):
                self._build_stack(gids[s:s + self.max_groups_per_stack], groups, device)

    def _build_stack(self, gids: list[tuple[str, str]], groups: dict, device: torch.device) -> None:
        dm = self.trainer.datamodule
        members = []
        for gid in gids:
            row = []
            for _, n in groups[gid]:
                c = self._cands[n][gid[0]]
                pm = prepare_matrix(dm.weight(n).to(device), c, n)
                self._prepared[(gid[0], n)] = pm
                row.append(pm)
            members.append(row)
        c0 = self._cands[groups[gids[0]][0][1]][gids[0][0]]
        spec = ae_format.ae_spec(c0)
        size = sum(pm.target.numel() for row in members for pm in row) * 4 * 2
        on_device = self.patches_on_device if self.patches_on_device is not None else size < (2 << 30)
        data = ae_recipe.GroupData(members, spec, device=device if on_device else "cpu")
        for row in members:  # the patches hold the data now; keep only what the containers need
            for pm in row:
                pm.target = pm.weight = None
        seeds = [ae_recipe.seed_of(self.compression.seed, *gid) for gid in gids]
        stack = ae_recipe.AEStack(spec, c0.bits, c0.options.dim, len(gids), seeds, qat=self.sched.qat)
        self._stacks.append((stack, data, gids))

    def choice_error(self) -> str:
        """The adaptive choice's error term: `adaptive.error`, "auto" meaning the output error when calibrated."""
        wanted = self.adaptive.error if self.adaptive is not None else "auto"
        if wanted == "auto":
            return "output" if self.calibration is not None else "weight"
        return wanted

    def _save_candidate(self, label: str, index: int, name: str, W: torch.Tensor, weight: ReALLMWeight,
                        cfg: CompressionConfig, extra: dict[str, Any] | None = None) -> None:
        stats = {**self.matrix_stats(name, W, weight), **(extra or {})}
        self.evaluated(label).save(index, name, weight.to("cpu"), stats, self.store_key(cfg))

    # -- training -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:  # the shared VQ codebooks were fitted in setup
        super(CompressPhase, self).on_fit_start()

    def configure_optimizers(self):
        device = self.device
        for stack, _, _ in self._stacks:
            stack.to(device)
        params = [p for stack, _, _ in self._stacks for p in stack.parameters()] or [self._ddp_anchor]
        total = max(1, self.sched.epochs * self._steps)
        opt, sched = schedules.adam_with_cosine(params, self.sched.lr, total, self.sched.warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        self._epoch_losses = []
        for stack, data, _ in self._stacks:
            info = ae_recipe.on_epoch_start(stack, data, self.sched, self.current_epoch)
            if "kmeans_inertia" in info:
                self.log("latent_kmeans_inertia", info["kmeans_inertia"], on_epoch=True, batch_size=1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not self._stacks:
            return None
        step = int(batch)
        opt = self.optimizers()
        sch = self.lr_schedulers()
        opt.zero_grad()
        per_group = []
        for stack, data, _ in self._stacks:
            loss, per = ae_recipe.training_step(stack, data, self.sched, self.current_epoch, step)
            # a plain backward: each device's decoders are its own, no gradient is synchronised
            loss.backward()
            per_group.append(per)
        opt.step()
        sch.step()
        per = torch.cat(per_group)
        self._epoch_losses.append(per)
        self.log("recon_rel_sq_error", per.mean(), on_step=True, on_epoch=True, prog_bar=True, batch_size=1)
        return None

    def on_train_epoch_end(self) -> None:
        if self._epoch_losses:
            mse = torch.stack(self._epoch_losses).mean()
            self.log("recon_rel_error", mse.sqrt(), on_epoch=True, prog_bar=True, batch_size=1)

    # -- end: export, choice, assembly ------------------------------------------------------------
    def on_train_end(self) -> None:
        dm = self.trainer.datamodule
        index_of = {n: i for i, n in self._targets}
        for stack, data, gids in self._stacks:
            stack.eval()
            for g, gid in enumerate(gids):
                res = ae_recipe.export_group(stack, data, g)
                for name, _shape, _ in data.members[g]:
                    pm = self._prepared[(gid[0], name)]
                    cfg = self._cands[name][gid[0]]
                    weight = build_container(pm, cfg, res)
                    W = dm.weight(name).to(weight.frozen["latent_codes"].device)
                    self._save_candidate(gid[0], index_of[name], name, W, weight, cfg,
                                         {"group": gid[1], "group_size": len(data.members[g])})
        self.trainer.strategy.barrier()
        if self.global_rank == 0:
            self._choose_and_write()
        super().on_train_end()

    def _choose_and_write(self) -> None:
        """Rank 0: load every evaluated candidate, pick one per matrix, store the picks in `partial/`."""
        labels = sorted({lab for _, n in self._targets for lab in self._cands[n]})
        matrices, index_of = [], {}
        for i, n in self._targets:
            found = {}
            for lab, c in self._cands[n].items():
                got = self.evaluated(lab).load(i, n, self.store_key(c))
                if got is None:
                    if self.trainer.fast_dev_run or self.trainer.limit_train_batches != 1.0:
                        continue
                    raise RuntimeError(f"candidate {lab!r} of matrix {n} is missing (run interrupted?)")
                found[lab] = got
            matrices.append((n, found))
            index_of[n] = i
        selection = select(matrices, labels, self.adaptive, error=self.choice_error())
        for n, pick in selection.picks.items():
            self.finished.save(index_of[n], n, pick.weight, pick.stats, pick.weight.config.key())
            self._extras[n] = pick.record
        self._summary.update(selection.summary)
        self._summary["autoencoder_groups"] = self._group_info.get("groups", 0)
        self._summary["schedule"] = dataclasses.asdict(self.sched)

    def write_results(self, payload: dict[str, Any]) -> Path:
        payload = dict(payload)
        payload["matrices"] = [{**m, **self._extras.get(m["name"], {})} for m in payload.get("matrices", [])]
        payload.update(self._summary)
        return super().write_results(payload)
