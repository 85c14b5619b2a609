"""Phase 1 with the patch autoencoder (method.md §4), plus the adaptive per-matrix choice under a budget.

`AutoencoderPhase` extends the data-free `CompressPhase`:

1. ``setup``: every matrix × every candidate configuration is prepared. Candidates without a decoder
   (VQ, NF, ...) are compressed at once (data-free; a model-wide VQ codebook is fitted per candidate).
   Autoencoder candidates are grouped (matrices sharing one decoder and latent codebook, ``share`` in
   the config), groups of identical networks are stacked (`reallm.nn.ae_recipe.AEStack`, vmapped), and
   the groups are divided among the devices (longest-processing-time first).
2. ``fit``: a Lightning epoch is an autoencoder epoch; a step trains every stack of this device on one
   mini-batch of patches per group (Adam, cosine schedule with warm-up, MSE weighted so that it is the
   relative squared Frobenius error of W; latent VQ with straight-through gradients; QAT of the
   decoder at b_φ bits; a final stage with frozen codes). The reconstruction error is logged.
3. ``on_train_end``: each device exports its groups into containers (latent codes, latent codebook,
   bit-packed decoder) and measures each matrix's error by decoding the stored container; rank 0 then
   picks one candidate per matrix (`reallm.adaptive.choose`, exact MILP under the global budget; the
   trivial choice when there is one candidate), charges each shared decoder / codebook to the matrices
   that use it, writes the chosen containers to ``partial/`` and lets `CompressPhase` assemble the model,
   save the checkpoint and write ``results.json`` (with the choice and its reason for every matrix).

Everything a device computes is written to ``run_dir/partial/cand/<label>/`` as soon as it is done, so an
interrupted run restarted with the same ``--run_dir`` skips the candidates and groups already finished
(a group interrupted mid-training is retrained from the start).

`PatchDataModule` is the `WeightDataModule` whose training loader yields the step indices of an epoch
(the patches themselves stay in the phase, on the device).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from reallm.adaptive import AdaptiveConfig, Candidate, choose, evaluate_fixed
from reallm.codecs import autoencoder as ae_format
from reallm.config import CompressionConfig
from reallm.container import ReALLMWeight, compress_weight, relative_error
from reallm.datamodules.weights import WeightDataModule
from reallm.errors import UserError
from reallm.files import atomic_save_safetensors, atomic_write_text, tensor_digest
from reallm.hf import find_decoder_blocks
from reallm.modules.compress import CompressPhase
from reallm.nn.patches import patch_grid
from reallm.surgery import fit_shared_tensors
from reallm.training import autoencoder as ae_recipe
from reallm.training import schedules

__all__ = ["AutoencoderPhase", "PatchDataModule", "assign_groups"]


# ---------------------------------------------------------------------------------------------
# data: step indices
# ---------------------------------------------------------------------------------------------
class _Steps(IterableDataset):
    """0 .. n−1, n = the phase's steps per epoch (the same on every device)."""

    def __init__(self, dm: PatchDataModule) -> None:
        self.dm = dm

    def _n(self) -> int:
        module = getattr(getattr(self.dm, "trainer", None), "lightning_module", None)
        return int(module.steps_per_epoch()) if hasattr(module, "steps_per_epoch") else 1

    def __len__(self) -> int:
        return self._n()

    def __iter__(self):
        return iter(range(self._n()))


class PatchDataModule(WeightDataModule):
    """The weights of a model (as `WeightDataModule`) for the autoencoder phase: the phase cuts them
    into patches and keeps them on its device; the training loader yields the step indices of one
    epoch (an IterableDataset: every device runs all steps over its own groups of matrices)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self), batch_size=None)


# ---------------------------------------------------------------------------------------------
# candidate results on disk
# ---------------------------------------------------------------------------------------------
def _save_container(base: Path, name: str, weight: ReALLMWeight, stats: dict[str, Any], key: str) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = weight.to_dict()
    tensors.update({f"shared.{k}": v for k, v in weight.shared.items()})
    atomic_save_safetensors(tensors, base.with_suffix(".safetensors"))
    atomic_write_text(base.with_suffix(".json"),
                      json.dumps({"name": name, "key": key, "container": meta, "stats": stats}))


def _load_container(base: Path, name: str, key: str | None) -> tuple[ReALLMWeight, dict[str, Any]] | None:
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        if meta.get("name") != name or (key is not None and meta.get("key") != key):
            return None
        tensors = load_file(base.with_suffix(".safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError):
        return None
    shared = {k[len("shared."):]: v for k, v in tensors.items() if k.startswith("shared.")}
    return ReALLMWeight.from_dict(tensors, meta["container"], shared), meta.get("stats", {})


def assign_groups(costs: dict[Any, float], world: int) -> dict[Any, int]:
    """Device of each group: longest processing time first (each group, by decreasing cost, goes to the
    least-loaded device), deterministic, so every device computes the same assignment. Its makespan
    is at most 4/3 of the optimum (Graham 1969), so N devices run the phase about N× faster when the
    groups are many or of similar cost."""
    load = [0.0] * max(1, world)
    owner = {}
    for gid in sorted(costs, key=lambda g: (-costs[g], str(g))):
        r = min(range(len(load)), key=lambda k: (load[k], k))
        owner[gid] = r
        load[r] += costs[gid]
    return owner


def _merge(base: CompressionConfig, overrides: dict[str, Any], label: str = "main") -> CompressionConfig:
    """The base config with a candidate's overrides (a nested "autoencoder" dict is merged), checked."""
    changes = dict(overrides)
    if isinstance(changes.get("autoencoder"), dict) and base.autoencoder:
        changes["autoencoder"] = {**base.autoencoder, **changes["autoencoder"]}
    try:
        cfg = CompressionConfig.from_dict({**base.to_dict(), **changes})
        if cfg.quantizer == "autoencoder":
            ae_format.ae_spec(cfg)
        return cfg
    except (TypeError, ValueError) as e:
        raise UserError(f"configuration {label!r}: {e}") from None


def _own_bits(weight: ReALLMWeight) -> tuple[float, float]:
    """(bits of the matrix without its shared tensors, bits of the shared tensors)."""
    shared = float(sum(t.numel() * t.element_size() * 8 for t in weight.shared.values()))
    share = weight.shape[0] * weight.shape[1] / weight.meta.get("shared_numel", weight.shape[0] * weight.shape[1])
    return weight.bits()["total"] - shared * share, shared


# ---------------------------------------------------------------------------------------------
# the phase
# ---------------------------------------------------------------------------------------------
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
        """
        super().__init__(model_name_or_path, compression, layer_configs, method, run_dir, checkpoint, seed)
        self.adaptive = adaptive
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
        base = self.config_for(name)
        if base is None:
            return {}
        if self.adaptive is None or not self.adaptive.candidates:
            return {"main": _merge(base, {})}
        return {label: _merge(base, ov, label) for label, ov in self.adaptive.candidates.items()}

    def _cand_base(self, label: str, index: int) -> Path:
        return self.partial_dir / "cand" / label / f"{index:05d}"

    def steps_per_epoch(self) -> int:
        return self._steps

    # -- setup: data-free candidates, autoencoder groups ----------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        dm = self.trainer.datamodule
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

        # data-free candidates: shared codebooks (identical on every rank), then this rank's share
        plain = [(i, n, lab, c) for i, n in self._targets for lab, c in self._cands[n].items()
                 if c.quantizer != "autoencoder"]
        by_label: dict[str, list] = {}
        for _, n, lab, c in plain:
            by_label.setdefault(lab, []).append((n, dm.model.get_submodule(n), c))
        shared = {lab: fit_shared_tensors(t, device=device, progress=False) for lab, t in by_label.items()}
        for k, (i, n, lab, c) in enumerate(plain):
            if k % world != rank or _load_container(self._cand_base(lab, i), n, c.key()) is not None:
                continue
            W = dm.weight(n).to(device)
            tensors, numel = shared[lab].get(c.key(), (None, None))
            weight = compress_weight(W, c, name=n, shared=tensors, shared_numel=numel)
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
        owner = assign_groups(cost, world)
        self._group_info = {"groups": len(groups), "owner": {f"{g[0]}|{g[1]}": r for g, r in owner.items()}}
        mine: dict[str, list[tuple[str, str]]] = {}
        for gid, members in groups.items():
            if owner[gid] != rank:
                continue
            c = self._cands[members[0][1]][gid[0]]
            done = all(_load_container(self._cand_base(gid[0], i), n, c.key()) is not None for i, n in members)
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
                pm = ae_recipe.prepare_matrix(dm.weight(n).to(device), c, n)
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
        stack = ae_recipe.AEStack(spec, c0.bits, c0.vq_dim, len(gids), seeds, qat=self.sched.qat)
        self._stacks.append((stack, data, gids))

    def _save_candidate(self, label: str, index: int, name: str, W: torch.Tensor, weight: ReALLMWeight,
                        cfg: CompressionConfig, extra: dict[str, Any] | None = None) -> None:
        err = relative_error(W, weight.dequantize())
        stats = {"rel_frobenius_error": err, "orig_dtype": str(W.dtype).replace("torch.", ""),
                 "w_norm2": float(W.float().square().sum()), **(extra or {})}
        _save_container(self._cand_base(label, index), name, weight.to("cpu"), stats, cfg.key())

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
                    weight = ae_recipe.build_container(pm, cfg, res)
                    W = dm.weight(name).to(weight.frozen["latent_codes"].device)
                    self._save_candidate(gid[0], index_of[name], name, W, weight, cfg,
                                         {"group": gid[1], "group_size": len(data.members[g])})
        self.trainer.strategy.barrier()
        if self.global_rank == 0:
            self._choose_and_write()
        super().on_train_end()

    def _choose_and_write(self) -> None:
        labels = sorted({lab for _, n in self._targets for lab in self._cands[n]})
        rows, results, names, numels = [], [], [], []
        shared_costs: dict[str, float] = {}
        relative = self.adaptive is None or self.adaptive.objective != "absolute"
        for i, n in self._targets:
            row, res_row = [], []
            for lab, c in self._cands[n].items():
                got = _load_container(self._cand_base(lab, i), n, c.key())
                if got is None:
                    if self.trainer.fast_dev_run or self.trainer.limit_train_batches != 1.0:
                        continue
                    raise RuntimeError(f"candidate {lab!r} of matrix {n} is missing (run interrupted?)")
                weight, stats = got
                own, shared_bits = _own_bits(weight)
                rid = None
                if weight.shared:
                    rid = lab + "|" + "|".join(tensor_digest(weight.shared[k]) for k in sorted(weight.shared))
                    shared_costs[rid] = shared_bits
                numel = weight.shape[0] * weight.shape[1]
                err = stats["rel_frobenius_error"]
                term = numel * err**2 if relative else stats.get("w_norm2", 1.0) * err**2
                row.append(Candidate(lab, own, term, rid, {"rel_frobenius_error": err, "numel": numel}))
                res_row.append((weight, stats))
            if not row:
                continue
            rows.append(row)
            results.append(res_row)
            names.append((i, n))
            numels.append(weight.shape[0] * weight.shape[1])
        total_weights = float(sum(numels))
        if self.adaptive is not None and len(labels) > 1:
            budget = self.adaptive.budget * total_weights
            try:
                choice = choose(rows, budget, shared_costs, time_limit=self.adaptive.time_limit,
                                names=[n for _, n in names])
            except ValueError as e:
                raise UserError(f"adaptive: {e}") from None
            picks, reasons = choice.picks, choice.reasons
            singles = {}
            for lab in labels:
                fx = evaluate_fixed(rows, lab, shared_costs)
                if fx is not None:
                    singles[lab] = {"bits_per_weight": fx["bits"] / total_weights, "objective": fx["objective"],
                                    "fits_budget": fx["bits"] <= budget}
            self._summary["adaptive"] = {
                "budget_bits_per_weight": self.adaptive.budget,
                "objective": "sum of n_m * rel_err_m^2" if relative else "sum of ||W - W_hat||_F^2",
                "solver": "scipy.optimize.milp (HiGHS)", "status": choice.status, "mip_gap": choice.gap,
                "objective_value": choice.objective, "bits_per_weight": choice.total_bits / total_weights,
                "budget_price_lambda": choice.price,
                "candidates": dict(self.adaptive.candidates),
                "single_config": singles,
                "counts": {lab: sum(1 for m, j in enumerate(picks) if rows[m][j].label == lab) for lab in labels},
            }
        else:
            picks = [0] * len(rows)
            reasons = ["the only configuration (no adaptive choice)"] * len(rows)
        # charge every shared resource to the matrices that use it
        users: dict[str, int] = {}
        for m, j in enumerate(picks):
            if rows[m][j].shared is not None:
                users[rows[m][j].shared] = users.get(rows[m][j].shared, 0) + numels[m]
        for m, j in enumerate(picks):
            (i, n), cand = names[m], rows[m][j]
            weight, stats = results[m][j]
            if cand.shared is not None:
                weight.meta["shared_numel"] = users[cand.shared]
            stats = dict(stats, config=cand.label, reason=reasons[m])
            stats.pop("w_norm2", None)
            _save_container(self.partial_dir / f"{i:05d}", n, weight, stats, weight.config.key())
            self._extras[n] = {
                "config": cand.label,
                "reason": reasons[m],
                "candidates": {c.label: {"own_bits_per_weight": c.bits / numels[m],
                                         "rel_frobenius_error": c.info["rel_frobenius_error"]} for c in rows[m]},
            }
            if stats.get("group"):
                self._extras[n]["group"] = stats["group"]
                self._extras[n]["group_size"] = stats.get("group_size")
        self._summary["autoencoder_groups"] = self._group_info.get("groups", 0)
        self._summary["schedule"] = dataclasses.asdict(self.sched)

    def write_results(self, payload: dict[str, Any]) -> Path:
        payload = dict(payload)
        payload["matrices"] = [{**m, **self._extras.get(m["name"], {})} for m in payload.get("matrices", [])]
        payload.update(self._summary)
        return super().write_results(payload)
