"""The patch autoencoder's training recipe (method.md §4), plain functions and ``nn.Module`` s, no Lightning.

    W (p, q) ─ low-rank ─► R = W − L1 L2ᵀ ─ normalize_residual ─► Y (p, q), values in [−1, 1]
      Y ─ P0 × P1 patches ─► E_ψ ─► latent (e2, h, w) per patch ─ VQ (b bits, dim d) ─► codes
      codes ─ codebook ─► D_φ (b_φ-bit convs) ─► Ŷ patches ─► Ŷ (p, q) ─ × block scales ─► R̂

- :class:`PreparedMatrix`: one matrix ready for the autoencoder (made by
  `reallm.phases.autoencoder_matrices.prepare_matrix`, which runs the shared encoding pipeline's stages).
- :class:`GroupData` / :class:`AEStack`: the patches of G groups (a group = matrices sharing one
  decoder) and G encoder/decoder pairs of one architecture trained *together*: parameters are stacked
  and the forward pass is ``torch.func.vmap`` over ``functional_call`` (no Python loop over decoders).
- :class:`TrainSchedule` + :func:`train_stacks`: the recipe (Adam, cosine with warm-up, latent VQ switched
  on after a float warm-up and refreshed by k-means, then a final stage where codes are frozen and only
  decoder + latent codebook train, i.e. exactly what is stored).
- :func:`export_group`: the stored tensors of a trained group, in the format of
  `reallm.formats.autoencoder.codec` (which decodes them); `reallm.phases.autoencoder_matrices.build_container`
  turns them into containers.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from reallm.core.hf_models import decoder_block_index
from reallm.core.schedules import adam_with_cosine
from reallm.formats.autoencoder.codec import AESpec, ae_spec, from_vectors, latent_mask, pack_decoder, to_vectors
from reallm.formats.autoencoder.networks import PixelShuffleDecoder, quantize_decoder_
from reallm.formats.autoencoder.ste import straight_through
from reallm.formats.base import FormatConfig
from reallm.ops.kmeans import kmeans
from reallm.ops.packing import pack_bits
from reallm.ops.patches import matrix_to_patches

__all__ = [
    "AEStack",
    "GroupData",
    "GroupResult",
    "PreparedMatrix",
    "TrainSchedule",
    "assign_groups",
    "export_group",
    "group_key",
    "on_epoch_start",
    "seed_of",
    "stack_key",
    "train_stacks",
    "training_step",
]


def group_key(config: FormatConfig, name: str, blocks_prefix: str | None = None) -> str:
    """Matrices with the same key share one decoder and latent codebook (``AESpec.share``)."""
    spec = ae_spec(config)
    base = config.key()
    if spec.share == "model":
        return base
    if spec.share == "matrix":
        return f"{base}|{name}"
    kind = name.rsplit(".", 1)[-1]
    if spec.share == "type":
        return f"{base}|{kind}"
    k = int(spec.share.split(":", 1)[1])
    block = decoder_block_index(name, blocks_prefix)
    return f"{base}|{kind}|{block // k if block is not None else name}"


def assign_groups(costs: dict[Any, float], world: int) -> dict[Any, int]:
    """Device of each group: longest processing time first (each group, by decreasing cost, goes to the
    least-loaded device), deterministic, so every device computes the same assignment. Its makespan
    is at most 4/3 of the optimum (Graham 1969), so N devices run the phase about N× faster when the
    groups are many or of similar cost.

    Args:
        costs: group id → its cost (patches × decoder parameters).
        world: number of devices.
    """
    load = [0.0] * max(1, world)
    owner = {}
    for gid in sorted(costs, key=lambda g: (-costs[g], str(g))):
        r = min(range(len(load)), key=lambda k: (load[k], k))
        owner[gid] = r
        load[r] += costs[gid]
    return owner


def stack_key(config: FormatConfig) -> str:
    """Groups with the same key have identical networks and can be trained as one vmapped stack."""
    spec = ae_spec(config).to_dict()
    spec.pop("share")
    return f"{sorted(spec.items())}|b={config.bits}|d={config.options.dim}"




# ---------------------------------------------------------------------------------------------
# one matrix: low-rank part, normalisation, patches
# ---------------------------------------------------------------------------------------------
@dataclass
class PreparedMatrix:
    """One matrix ready for the autoencoder.

    target: Y (p, q) normalised residual (rotated / permuted domain), fp32.
    weight: loss weights (p, q): ŝ² · p·q / ‖W‖², so mean(weight · (Y − Ŷ)²) = ‖R − R̂‖² / ‖W‖², the
            squared relative Frobenius error of the whole reconstruction.
    frozen: stored pre-processing tensors (scale codes, permutation, rotation seeds).
    lowrank: stored low-rank factors; meta: container metadata (rank, ...).
    """

    name: str
    shape: tuple[int, int]
    target: Tensor
    weight: Tensor
    frozen: dict[str, Tensor]
    lowrank: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def nearest_codes(v: Tensor, codebook: Tensor, chunk_elems: int = 1 << 24) -> Tensor:
    """Nearest codeword index of every vector. v (S, N, d), codebook (S, K, d) -> (S, N) int64
    (in chunks of N so that a (S, chunk, K) distance block stays below ``chunk_elems``)."""
    S, N, _ = v.shape
    K = codebook.shape[1]
    cb = codebook.detach().float()
    c_t, c2 = cb.transpose(1, 2), cb.square().sum(-1).unsqueeze(1)  # (S, d, K), (S, 1, K)
    step = max(1, chunk_elems // max(1, S * K))
    out = []
    with torch.autocast(v.device.type, enabled=False):  # distances in fp32 even under bf16 autocast
        for s in range(0, N, step):
            x = v[:, s:s + step].detach().float()
            out.append((c2 - 2 * x @ c_t).argmin(dim=-1))  # ||x||² is constant per row
    return torch.cat(out, dim=1) if out else v.new_zeros(S, 0, dtype=torch.long)


def _gather_codewords(codebook: Tensor, codes: Tensor) -> Tensor:
    """codebook (S, K, d), codes (S, ...) -> (S, ..., d)."""
    S, K, d = codebook.shape
    flat = codes.reshape(S, -1)
    out = torch.gather(codebook, 1, flat.unsqueeze(-1).expand(-1, -1, d))  # (S, N, d)
    return out.reshape(*codes.shape, d)


def _fp16_ste(t: Tensor) -> Tensor:
    return straight_through(t, t.detach().half().to(t.dtype))


# ---------------------------------------------------------------------------------------------
# training data of a stack of groups
# ---------------------------------------------------------------------------------------------
class GroupData:
    """Patches of G groups, padded to the largest group: targets (G, n_max, 1, P0, P1), loss weights
    (same shape, 0 on padding and on filler patches), latent masks (G, n_max, 1, h, w), and for each group
    the slice of patches of each member matrix.

    Kept on ``device`` (default: where the targets are); :meth:`batch` moves a mini-batch to the training
    device. An epoch visits every patch of the largest group once; smaller groups cycle through theirs.
    """

    def __init__(self, groups: Sequence[Sequence[PreparedMatrix]], spec: AESpec, device=None):
        self.spec = spec
        tgt, wts, msk, self.members, self.sizes = [], [], [], [], []
        for members in groups:
            t, w, m, slices, start = [], [], [], [], 0
            for pm in members:
                x, _ = matrix_to_patches(pm.target, spec.patch_hw)
                wx, _ = matrix_to_patches(pm.weight, spec.patch_hw)
                t.append(x)
                w.append(wx)
                m.append(latent_mask(pm.shape, spec, x.device))
                slices.append((start, start + x.shape[0]))
                start += x.shape[0]
            tgt.append(torch.cat(t))
            wts.append(torch.cat(w))
            msk.append(torch.cat(m))
            self.members.append([(pm.name, pm.shape, sl) for pm, sl in zip(members, slices)])
            self.sizes.append(start)
        self.n_max = max(self.sizes)
        pad = lambda t: F.pad(t, (0, 0, 0, 0, 0, 0, 0, self.n_max - t.shape[0]))  # noqa: E731
        self.targets = torch.stack([pad(t) for t in tgt]).to(device)  # (G, n_max, 1, P0, P1)
        self.weights = torch.stack([pad(w) for w in wts]).to(device)
        self.masks = torch.stack([pad(m) for m in msk]).to(device)  # (G, n_max, 1, h, w) bool

    @property
    def n_groups(self) -> int:
        return len(self.sizes)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.n_max // batch_size)

    def indices(self, epoch: int, step: int, batch_size: int, seed: int = 0) -> Tensor:
        """Patch indices (G, B) of one step: a seeded permutation of each group per epoch, cycled."""
        out = []
        for g, n in enumerate(self.sizes):
            gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + g) % (1 << 62))
            perm = torch.randperm(n, generator=gen)
            pos = (step * batch_size + torch.arange(batch_size)) % n
            out.append(perm[pos])
        return torch.stack(out)  # (G, B)

    def batch(self, idx: Tensor, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(targets, weights, masks) of patch indices idx (G, B), on ``device``, and idx itself."""
        idx = idx.to(self.targets.device)
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]  # (G, 1)
        take = lambda t: t[rows, idx].to(device, non_blocking=True)  # noqa: E731  (G, B, ...)
        return take(self.targets), take(self.weights), take(self.masks), idx.to(device)


# ---------------------------------------------------------------------------------------------
# G autoencoders of one architecture, trained together
# ---------------------------------------------------------------------------------------------
def seed_of(*parts: Any) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode()) % (1 << 31)


class AEStack(nn.Module):
    """G encoder/decoder pairs of identical architecture with stacked parameters, run with ``vmap``.

    Parameters are ``(G, ...)`` tensors (``enc.*``, ``dec.*``); ``codebook`` (G, K, d) is the latent
    VQ codebook of each group (a buffer, a parameter in the final stage). Modes:
      - ``"float"``: continuous latent (warm-up);
      - ``"vq"``: latent quantized with the current codebook, straight-through gradient to the encoder;
      - ``"frozen"``: codes fixed (``freeze_codes``), the encoder is unused; decoder and codebook train.
    QAT: the decoder's convs quantize their weights to b_φ bits in the forward pass unless ``qat`` is
    False (PTQ then quantizes once after training, in :func:`export_group`).
    """

    def __init__(self, spec: AESpec, bits: int, dim: int, n_groups: int, seeds: Sequence[int], qat: bool = True):
        super().__init__()
        self.spec, self.bits, self.dim, self.n_groups, self.qat = spec, int(bits), int(dim), int(n_groups), qat
        self.num_codes = 2 ** (self.bits * self.dim)
        encs, decs = [], []
        for s in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(s))
                encs.append(spec.build_encoder())
                decs.append(spec.build_decoder())
        self._enc_base = [copy.deepcopy(encs[0]).to("meta")]  # lists: not registered as submodules
        self._dec_base = [copy.deepcopy(decs[0]).to("meta")]
        for m in self._dec_base[0].modules():
            if hasattr(m, "quantize_weights"):
                m.quantize_weights = qat
        ep, eb = stack_module_state(encs)
        dp, db = stack_module_state(decs)
        self.params = nn.ParameterDict({_k("enc." + k): nn.Parameter(v.detach()) for k, v in ep.items()})
        self.params.update({_k("dec." + k): nn.Parameter(v.detach()) for k, v in dp.items()})
        for k, v in {**{"enc." + k: v for k, v in eb.items()}, **{"dec." + k: v for k, v in db.items()}}.items():
            self.register_buffer("b_" + _k(k), v.detach().clone(), persistent=False)
        # (G, K, d) latent codebooks: fitted by k-means when the VQ stage starts (and at every refresh); in
        # between, and in the frozen-codes stage, the codewords in use also learn by gradient: the decoder
        # reads z_q = codebook[codes], whose gradient reaches them (the straight-through term only adds the
        # encoder's). Deliberate: it is what the stored codebook is finally fine-tuned by. No gradient in
        # the float stage (no codeword is used).
        self.codebook = nn.Parameter(torch.zeros(self.n_groups, self.num_codes, self.dim))
        self.register_buffer("codes", None)  # (G, n_max, e2/d, h, w) in the frozen stage
        self.mode = "float"
        self._commit: Tensor | None = None

    # -- parameters as the functional calls want them ------------------------------------------
    def _split(self, prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        n = len(prefix)
        params = {_u(k)[n:]: v for k, v in self.params.items() if _u(k).startswith(prefix)}
        bufs = {_u(k[2:])[n:]: v for k, v in self._buffers.items()
                if k.startswith("b_") and _u(k[2:]).startswith(prefix)}
        return params, bufs

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [v for k, v in self.params.items() if _u(k).startswith("dec.")]

    def encode(self, x: Tensor) -> Tensor:  # (G, B, 1, P0, P1) -> (G, B, e2, h, w)
        p, b = self._split("enc.")
        base = self._enc_base[0]
        return vmap(lambda p_, b_, x_: functional_call(base, (p_, b_), (x_,)))(p, b, x)

    def decode(self, z: Tensor) -> Tensor:  # (G, B, e2, h, w) -> (G, B, 1, P0, P1)
        p, b = self._split("dec.")
        base = self._dec_base[0]
        return vmap(lambda p_, b_, z_: functional_call(base, (p_, b_), (z_,)))(p, b, z)

    def current_codebook(self) -> Tensor:
        return _fp16_ste(self.codebook)  # (G, K, d), rounded to what is stored (fp16)

    def latent(self, x: Tensor, mask: Tensor, idx: Tensor | None = None) -> Tensor:
        """Latent fed to the decoder (G, B, e2, h, w): float, quantized (STE) or from frozen codes;
        zero where the mask (G, B, 1, h, w) is False."""
        self._commit = None
        if self.mode == "frozen":
            rows = torch.arange(self.n_groups, device=idx.device)[:, None]
            codes = self.codes[rows, idx]  # (G, B, e2/d, h, w)
            z = from_vectors(_gather_codewords(self.current_codebook(), codes))
        else:
            z = self.encode(x)
            if self.mode == "vq":
                v = to_vectors(z, self.dim)  # (G, B, e2/d, h, w, d)
                cb = self.current_codebook()
                codes = nearest_codes(v.detach().reshape(self.n_groups, -1, self.dim), cb).view(v.shape[:-1])
                z_q = from_vectors(_gather_codewords(cb, codes))
                # value z_q; gradient straight through to the encoder *and* to the codewords used
                m = mask.to(z.dtype)
                self._commit = ((z - z_q.detach()).square() * m).flatten(1).sum(1) / (
                    m.flatten(1).sum(1) * z.shape[2]).clamp_min(1)  # (G,) commitment ||z − sg(z_q)||²
                z = z_q + (z - z.detach())
        return z * mask.to(z.dtype)

    def loss(self, x: Tensor, weight: Tensor, mask: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Weighted squared error summed per group (G,) and the per-group weight count (G,).
        In the VQ stage, :attr:`commitment` (G,) holds the encoder's commitment term of this batch."""
        out = self.decode(self.latent(x, mask, idx))
        err = (weight * (out - x).square()).flatten(1).sum(1)  # (G,)
        return err, (weight > 0).flatten(1).sum(1).to(err.dtype)

    @property
    def commitment(self) -> Tensor | None:
        return self._commit

    # -- latent codebook --------------------------------------------------------------------
    @torch.no_grad()
    def all_latents(self, data: GroupData, chunk: int = 64) -> list[Tensor]:
        """Float latent vectors of every stored position of every group: list of (N_g, d)."""
        device = self.codebook.device
        out: list[list[Tensor]] = [[] for _ in range(self.n_groups)]
        for s in range(0, data.n_max, chunk):
            x = data.targets[:, s:s + chunk].to(device)
            m = data.masks[:, s:s + chunk].to(device)
            v = to_vectors(self.encode(x), self.dim)  # (G, c, e2/d, h, w, d)
            keep = m.expand(-1, -1, v.shape[2], -1, -1)  # (G, c, e2/d, h, w)
            for g in range(self.n_groups):
                hi = min(s + chunk, data.sizes[g]) - s
                if hi > 0:
                    out[g].append(v[g, :hi][keep[g, :hi]])
        return [torch.cat(o) for o in out]

    @torch.no_grad()
    def refresh_codebooks(self, data: GroupData, iters: int = 25, max_points: int = 1 << 17, seed: int = 0) -> float:
        """k-means codebook of each group on its current latents; returns the mean inertia."""
        inertia = []
        for g, v in enumerate(self.all_latents(data)):
            k = min(self.num_codes, v.shape[0])
            res = kmeans(v, k, iters=iters, tol=1e-4, seed=seed + g, max_points=max_points)
            cb = res.codebook
            if k < self.num_codes:
                cb = cb[torch.arange(self.num_codes, device=cb.device) % k]
            self.codebook.data[g].copy_(cb.half().float())
            inertia.append(res.inertia)
        self.mode = "vq"
        return float(sum(inertia) / max(1, len(inertia)))

    @torch.no_grad()
    def compute_codes(self, data: GroupData, chunk: int = 64) -> Tensor:
        """Codes (G, n_max, e2/d, h, w) of every patch with the current encoder and codebook."""
        device = self.codebook.device
        cb = self.current_codebook().detach()
        parts = []
        for s in range(0, data.n_max, chunk):
            v = to_vectors(self.encode(data.targets[:, s:s + chunk].to(device)), self.dim)
            parts.append(nearest_codes(v.reshape(self.n_groups, -1, self.dim), cb).view(v.shape[:-1]))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def freeze_codes(self, data: GroupData) -> None:
        """Fix the codes (final stage): from now on only the decoder and the codebook train."""
        self.codes = self.compute_codes(data)
        self.mode = "frozen"

    # -- per-group modules ----------------------------------------------------------------------
    def decoder(self, g: int) -> PixelShuffleDecoder:
        """A real decoder module holding group g's (float) weights."""
        with torch.random.fork_rng(devices=[]):
            dec = self.spec.build_decoder()
        p, _ = self._split("dec.")
        dec.load_state_dict({k: v[g].detach() for k, v in p.items()})
        return dec.to(self.codebook.device)


def _k(name: str) -> str:  # ParameterDict keys cannot contain "."
    return name.replace(".", "__")


def _u(key: str) -> str:
    return key.replace("__", ".")


# ---------------------------------------------------------------------------------------------
# the training recipe
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainSchedule:
    """How a stack is trained (method.md §4 "Training"; the paper: Adam, peak lr 1e-3, cosine with
    warm-up, 2000 epochs, batch 2 patches).

    Args:
        epochs: training epochs (an epoch visits every patch of the largest group once).
        lr: peak learning rate of Adam.
        warmup: fraction of the steps with a linear warm-up.
        batch_size: patches per group per step.
        vq_start: fraction of the epochs trained with a float latent before the latent VQ starts
            (its codebook is then fitted by k-means on the latents).
        vq_refresh: refit the latent codebook by k-means every this many epochs while the encoder trains
            (0: only once, when the VQ starts; in between the codewords learn by gradient).
        commitment: weight β of the VQ-VAE commitment term β‖z − sg(z_q)‖² that keeps the encoder's
            latents near their codewords.
        finetune: final fraction of the epochs with frozen codes: only the decoder and the latent
            codebook train, on exactly what is stored.
        qat: quantization-aware training of the decoder at b_φ bits; False trains a float decoder and
            quantizes it after training (PTQ).
        kmeans_iters: Lloyd iterations of each codebook fit.
        seed: seed of the patch order.
    """

    epochs: int = 100
    lr: float = 1e-3
    warmup: float = 0.05
    batch_size: int = 2
    vq_start: float = 0.3
    vq_refresh: int = 0
    commitment: float = 0.25
    finetune: float = 0.2
    qat: bool = True
    kmeans_iters: int = 25
    seed: int = 0

    def stage_epochs(self) -> tuple[int, int]:
        """(first epoch with the latent VQ, first epoch with frozen codes); ``epochs`` if none."""
        e = max(1, self.epochs)
        vq = min(e - 1, max(0, round(self.vq_start * e)))
        frozen = max(vq, e - round(self.finetune * e)) if self.finetune > 0 else e
        return vq, frozen


def on_epoch_start(stack: AEStack, data: GroupData, sched: TrainSchedule, epoch: int) -> dict[str, float]:
    """Stage switches at the start of an epoch (the same code for the phase and the plain loop):
    latent VQ on at ``vq_start`` (k-means codebook), refreshed every ``vq_refresh`` epochs, codes frozen
    from the fine-tune epoch on."""
    vq_epoch, frozen_epoch = sched.stage_epochs()
    info: dict[str, float] = {}
    if epoch >= frozen_epoch and stack.mode != "frozen":
        if stack.mode == "float":
            info["kmeans_inertia"] = stack.refresh_codebooks(data, sched.kmeans_iters, seed=sched.seed)
        stack.freeze_codes(data)
    elif stack.mode != "frozen" and epoch >= vq_epoch:
        since = epoch - vq_epoch
        if stack.mode == "float" or (sched.vq_refresh and since and since % sched.vq_refresh == 0):
            info["kmeans_inertia"] = stack.refresh_codebooks(data, sched.kmeans_iters, seed=sched.seed)
    return info


def training_step(stack: AEStack, data: GroupData, sched: TrainSchedule, epoch: int,
                  step: int) -> tuple[Tensor, Tensor]:
    """Loss of one step of a stack (sum over groups of their relative squared error on the batch, plus
    the commitment term in the VQ stage) and the per-group errors (G,), detached, for logging."""
    device = stack.codebook.device
    idx = data.indices(epoch, step, sched.batch_size, sched.seed)
    x, w, m, idx = data.batch(idx, device)
    err, count = stack.loss(x, w, m, idx)
    per_group = err / count.clamp_min(1)
    loss = per_group.sum()
    if stack.commitment is not None and sched.commitment:
        loss = loss + sched.commitment * stack.commitment.sum()
    return loss, per_group.detach()


def train_stacks(stacks: Sequence[tuple[AEStack, GroupData]], sched: TrainSchedule,
                 log: Callable[[int, float], None] | None = None) -> list[float]:
    """Plain training loop over several stacks (benchmarks, short fits of the adaptive chooser).
    Returns the mean training loss of each epoch."""
    steps = max(d.steps_per_epoch(sched.batch_size) for _, d in stacks)
    params = [p for s, _ in stacks for p in s.parameters()]
    opt, lr_sched = adam_with_cosine(params, sched.lr, steps * sched.epochs, sched.warmup)
    history = []
    for epoch in range(sched.epochs):
        for stack, data in stacks:
            on_epoch_start(stack, data, sched, epoch)
        total, n = 0.0, 0
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            for stack, data in stacks:
                loss, per = training_step(stack, data, sched, epoch, step)
                loss.backward()  # per stack: frees its activations before the next stack
                total += float(per.sum())
                n += per.numel()
            opt.step()
            lr_sched.step()
        history.append(total / max(1, n))
        if log is not None:
            log(epoch, history[-1])
    return history


# ---------------------------------------------------------------------------------------------
# export: stored tensors of a group, containers
# ---------------------------------------------------------------------------------------------
@dataclass
class GroupResult:
    """What a trained group stores: the shared tensors (decoder + latent codebook), the decoder's JSON
    meta, and the packed latent codes of each member matrix."""

    shared: dict[str, Tensor]
    decoder_meta: dict[str, Any]
    codes: dict[str, Tensor]  # name -> packed latent codes
    shared_numel: int




@torch.no_grad()
def export_group(stack: AEStack, data: GroupData, g: int) -> GroupResult:
    """Stored form of group g: quantized decoder (PTQ now if it was trained without QAT), latent
    codebook (fp16) and each member's latent codes (valid positions only, packed at b·d bits)."""
    dec = stack.decoder(g)
    if not stack.qat:
        quantize_decoder_(dec)
    meta, shared = pack_decoder(dec)
    cb = stack.current_codebook()[g].detach().half()
    shared["latent_codebook"] = cb.contiguous()
    if stack.mode == "frozen":
        codes_all = stack.codes[g]
    else:
        if stack.mode == "float":  # never quantized (a very short run): fit the codebook now
            stack.refresh_codebooks(data)
            cb = stack.current_codebook()[g].detach().half()
            shared["latent_codebook"] = cb.contiguous()
        codes_all = stack.compute_codes(data)[g]
    codes = {}
    mask = data.masks[g].to(codes_all.device)  # (n_max, 1, h, w)
    for name, _shape, (a, b) in data.members[g]:
        sel = codes_all[a:b][mask[a:b].expand(-1, codes_all.shape[1], -1, -1)]  # (n_vectors,)
        codes[name] = pack_bits(sel, stack.bits * stack.dim)
    numel = int(sum(s[0] * s[1] for _, s, _ in data.members[g]))
    return GroupResult({k: v.contiguous() for k, v in shared.items()}, meta, codes, numel)
