"""Model surgery: replace the linear layers of a Hugging Face causal LM by ReALLMLinear, in place.

`compress_(model, config, filter_fn)` works like torchao's `quantize_`: a config (or a mapping from
name patterns to configs) plus a filter choose what is compressed; layers are replaced one at a
time, so peak memory stays near one copy of the model plus one layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from reallm.core.errors import CompressionError
from reallm.core.hf_models import find_decoder_blocks, is_linear, linear_weight, set_module
from reallm.formats import get_codec
from reallm.layer.linear import ReALLMLinear, RuntimeMode
from reallm.weight.config import CompressionConfig
from reallm.weight.container import ReALLMWeight
from reallm.weight.pipeline import compress_weight, relative_error, shared_training_data

FilterFn = Callable[[str, nn.Module], bool]
ConfigSpec = CompressionConfig | Mapping[str, CompressionConfig | None]


def default_filter(blocks_prefix: str) -> FilterFn:
    """Every linear inside the decoder blocks; never the embeddings or the head."""
    return lambda name, module: is_linear(module) and name.startswith(blocks_prefix + ".")


def resolve_config(spec: ConfigSpec, name: str) -> CompressionConfig | None:
    """The config for a layer: the spec itself, or the first pattern (fnmatch) matching its name."""
    if isinstance(spec, CompressionConfig):
        return spec
    for pattern, cfg in spec.items():
        if fnmatch.fnmatchcase(name, pattern):
            return cfg
    return None


def swap_in(model: nn.Module, name: str, weight: ReALLMWeight, *, mode: RuntimeMode = "resident",
            stats: dict | None = None) -> ReALLMLinear:
    """Replace the linear layer `name` of `model` by a ReALLMLinear holding `weight` (its bias and layout
    taken from the layer it replaces). Returns the new layer."""
    old = model.get_submodule(name)
    bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
    layer = ReALLMLinear(weight, bias, mode=mode, name=name)
    layer.layout = "linear" if isinstance(old, nn.Linear) else "conv1d"
    layer.stats = dict(stats or {})
    set_module(model, name, layer)
    _attach_quantizer(model)
    return layer


def _attach_quantizer(model: nn.Module) -> None:
    """model.save_pretrained writes a ReALLM checkpoint (reallm.checkpoint.quantizer; imported here, when a model is
    compressed, not with the package)."""
    from reallm.checkpoint.quantizer import attach_quantizer

    attach_quantizer(model)


@dataclass
class CompressionSummary:
    """What compress_ did: per-layer relative Frobenius errors and bits per weight."""

    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def mean_rel_error(self) -> float:
        errs = [v["rel_frobenius_error"] for v in self.layers.values()]
        return sum(errs) / max(1, len(errs))


def select_layers(
    model: nn.Module, config: ConfigSpec, filter_fn: FilterFn | None = None
) -> list[tuple[str, nn.Module, CompressionConfig]]:
    """(name, module, config) of every layer compress_ would replace, in model order."""
    prefix, _ = find_decoder_blocks(model)
    filter_fn = filter_fn or default_filter(prefix)
    chosen = []
    for name, mod in model.named_modules():
        if isinstance(mod, ReALLMLinear) or not is_linear(mod) or not filter_fn(name, mod):
            continue
        cfg = resolve_config(config, name)
        if cfg is not None:
            chosen.append((name, mod, cfg))
    return chosen


@torch.no_grad()
def fit_shared_tensors(
    targets: list[tuple[str, nn.Module, CompressionConfig]],
    device: torch.device | str | None = None,
    progress: bool = True,
    moments: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
    """Tensors shared by every matrix of a config whose format shares them (`Codec.can_share`, e.g. one
    VQ codebook for `options.codebook_scope: model`), fitted on the pooled normalised residual vectors of all
    its matrices. Returns {config key: (shared tensors, weights of the sharing matrices)}.

    `moments` (layer name → its inputs' second moments, calibration-aware phase 1): a `weighted` format
    fits the shared tensors under every matrix's output-error weights (`reallm.weight.pipeline.value_weights`,
    mean 1 per matrix, so that each matrix weighs in the pool as much as without calibration)."""
    groups: dict[str, list[tuple[str, nn.Module, CompressionConfig]]] = {}
    for t in targets:
        if get_codec(t[2].quantizer).can_share(t[2]):
            groups.setdefault(t[2].key(), []).append(t)
    out = {}
    for key, members in groups.items():
        cfg = members[0][2]
        numel = sum(linear_weight(m).numel() for _, m, _ in members)
        budget = get_codec(cfg.quantizer).sample_size(cfg) or numel
        pooled, pooled_w = [], []
        gen = torch.Generator().manual_seed(cfg.seed)
        codec = get_codec(cfg.quantizer)
        for name, mod, _ in tqdm(members, desc="shared codebook: vectors", disable=not progress):
            W = linear_weight(mod).detach().to(device or mod.weight.device)
            h = moments.get(name) if moments is not None and codec.weighted else None
            vec, w = shared_training_data(W, cfg, name, h)
            vec, w = vec.cpu(), (w.cpu() if w is not None else None)
            take = max(1, round(budget * W.numel() / numel))  # proportional subsample
            if vec.shape[0] > take:
                sel = torch.randperm(vec.shape[0], generator=gen)[:take]
                vec, w = vec[sel], (w[sel] if w is not None else None)
            pooled.append(vec)
            pooled_w.append(w if w is not None else torch.ones_like(vec))
        vectors = torch.cat(pooled).to(device or "cpu")
        if moments is not None and codec.weighted:
            shared = codec.fit_shared(vectors, cfg, weights=torch.cat(pooled_w).to(vectors.device))
        else:
            shared = codec.fit_shared(vectors, cfg)
        out[key] = ({k: v.cpu() for k, v in shared.items()}, numel)
    return out


@torch.no_grad()
def compress_(
    model: nn.Module,
    config: ConfigSpec,
    filter_fn: FilterFn | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    mode: RuntimeMode = "resident",
    skip: Callable[[str], ReALLMLinear | None] | None = None,
    on_layer: Callable[[str, ReALLMLinear], None] | None = None,
    moments: Mapping[str, torch.Tensor] | None = None,
) -> CompressionSummary:
    """Replace, in place, the selected linear layers of `model` by ReALLMLinear.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral, Gemma, Qwen2, GPT-2, ...).
        config: one CompressionConfig for every selected layer, or a mapping from fnmatch name
            patterns to configs (first match wins; None or no match leaves the layer alone).
        filter_fn: (name, module) -> bool; default: every linear inside the decoder blocks.
        device: where to run the compression of each matrix (e.g. "cuda" for a model kept on
            CPU); the result is moved back next to the original layer.
        progress: show a progress bar.
        mode: runtime mode of every new ReALLMLinear ("resident": packed in memory, decoded on the fly;
            "cache": a dense copy in the compute dtype).
        skip: name -> an already compressed layer to reuse (resuming an interrupted run), or None.
        on_layer: called after each layer is replaced (e.g. to save progress).
        moments: layer name → the second moments of its inputs on calibration data, (q,) or (q, q)
            (`reallm.phases.calibration.input_second_moments`): calibration-aware compression (a weighted
            format minimises the layer's output error). None: data-free.
    Returns:
        a CompressionSummary with each layer's relative Frobenius error and bits per weight.
    """
    targets = select_layers(model, config, filter_fn)
    if not targets:
        raise CompressionError("no layer matched the filter / config patterns: nothing to compress")
    shared = fit_shared_tensors(targets, device, progress, moments=moments)
    summary = CompressionSummary()
    bar = tqdm(targets, desc="compressing", unit="matrix", disable=not progress)
    for name, mod, cfg in bar:
        bar.set_postfix_str(name, refresh=False)
        layer = skip(name) if skip else None
        W = linear_weight(mod).detach()
        home = W.device
        if layer is None:
            tensors, numel = shared.get(cfg.key(), (None, None))
            Wd = W.to(device) if device is not None else W
            h = moments.get(name) if moments is not None else None
            weight = compress_weight(Wd, cfg, name=name, shared=tensors, shared_numel=numel,
                                     moments=None if h is None else h.to(Wd.device))
            layer = swap_in(model, name, weight.to(home), mode=mode)
        else:
            layer.layout = "linear" if isinstance(mod, nn.Linear) else "conv1d"
            set_module(model, name, layer)
        layer.stats.setdefault("rel_frobenius_error", relative_error(W, layer.dequantize().to(home)))
        layer.stats.setdefault("orig_dtype", str(W.dtype).replace("torch.", ""))
        layer.to(home)
        del mod, W
        summary.layers[name] = {
            "shape": [layer.out_features, layer.in_features],
            "rel_frobenius_error": layer.stats["rel_frobenius_error"],
            "bits": layer.container().bits()["per_weight"],
        }
        if on_layer is not None:
            on_layer(name, layer)
    _attach_quantizer(model)
    return summary


def mark_only_adapters_trainable(model: nn.Module) -> int:
    """Freeze everything but the DoRA/LoRA parameters (lora_A, lora_B, magnitude).

    Returns the number of trainable parameters.
    """
    n = 0
    for name, p in model.named_parameters():
        train = isinstance(model.get_submodule(name.rpartition(".")[0] or ""), ReALLMLinear)
        p.requires_grad_(train)
        n += p.numel() if train else 0
    return n
