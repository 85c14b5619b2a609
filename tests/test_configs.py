"""Every shipped config runs: each top-level configs/*.yaml on its own, and each method preset composed with
configs/ae.yaml, through the CLI (in process) with --trainer.fast_dev_run on a tiny model.

What a config needs comes from the phase contract of the class it names: a phase that starts from a
checkpoint is given a phase-1 checkpoint made once in a fixture, a phase that starts from the base model the
tiny model's directory; a text datamodule reads a local text file of the tiny tokenizer's words.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import save_tiny_model_dir, word_tokenizer, write_text

from reallm import CompressionConfig, compress_, load_compressed, save_compressed
from reallm.core.hf_models import load_hf_model
from reallm.run.cli import cli_main, phase_class

ROOT = Path(__file__).resolve().parents[1]
TOP = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
METHODS = sorted(f"methods/{p.name}" for p in (ROOT / "configs" / "methods").glob("*.yaml"))
SUBCOMMAND = {"eval.yaml": "validate"}  # every other config is a fit
CPU = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--artifacts.figures", "false"]
SEQ_LEN = 32
# the ReALLM presets' candidates and networks as shipped, the autoencoders' latent k-means made short (their VQ
# candidates, of another format than the autoencoder base, keep vq's default k-means options)
FAST_AE = "model:\n  init_args:\n    schedule: {kmeans_iters: 3}\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # tiny matrices: one thread is faster and robust to a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny base model directory, a phase-1 checkpoint of it (NF3 with rank-1 DoRA adapters, so that
    phases 2 and 3 have something to train), a text file and a token cache."""
    root = tmp_path_factory.mktemp("configs")
    base = save_tiny_model_dir(root / "base")
    model = load_hf_model(str(base), "float32")
    compress_(model, CompressionConfig(quantizer="nf", bits=3, rank=1), progress=False)
    save_compressed(model, root / "phase1", base_model=str(base), tokenizer=word_tokenizer())
    (root / "fast_ae.yaml").write_text(FAST_AE)
    return {"base": base, "checkpoint": root / "phase1", "text": write_text(root / "words.txt"),
            "cache": root / "tokens", "fast_ae": root / "fast_ae.yaml"}


def _class_paths(configs: list[Path]) -> tuple[str, str]:
    """(model class_path, data class_path) after composing the configs (the last one that sets it wins)."""
    model = data = None
    for path in configs:
        cfg = yaml.safe_load(path.read_text()) or {}
        model = (cfg.get("model") or {}).get("class_path", model)
        data = (cfg.get("data") or {}).get("class_path", data)
    return model, data


@pytest.mark.parametrize("config", TOP + METHODS)
def test_every_config_runs_one_fast_step(config, setup, tmp_path):
    configs = [ROOT / "configs" / "ae.yaml"] if config.startswith("methods/") else []
    configs.append(ROOT / "configs" / config)
    if Path(config).stem.startswith("reallm"):
        configs.append(setup["fast_ae"])
    model_path, data_path = _class_paths(configs)
    phase = phase_class(model_path)
    args = [SUBCOMMAND.get(config, "fit")] + [a for c in configs for a in ("--config", str(c))]
    if phase.starts_from == "checkpoint":
        args += ["--model.init_args.checkpoint", str(setup["checkpoint"])]
    else:
        args += ["--model.init_args.model_name_or_path", str(setup["base"])]
    if data_path.endswith("TextDataModule"):
        args += ["--data.init_args.path", str(setup["text"]), "--data.init_args.seq_len", str(SEQ_LEN),
                 "--data.init_args.max_eval_windows", "2", "--data.init_args.cache_dir", str(setup["cache"])]
        if args[0] == "fit":
            args += ["--data.init_args.train_path", str(setup["text"]), "--data.init_args.train_sequences", "8",
                     "--data.init_args.batch_size", "4"]
    run = tmp_path / "run"
    cli_main([*args, *CPU, "--trainer.fast_dev_run", "true", "--run_dir", str(run)])

    results = json.loads((run / "results.json").read_text())
    assert results["phase"] == phase.phase
    assert (run / "config.yaml").is_file()
    if config.startswith("methods/"):  # fast_dev_run: one matrix; the autoencoder phase makes all 14 in one step
        assert results["method"] == Path(config).stem
        assert results["compressed_matrices"] == (14 if phase.__name__ == "AutoencoderPhase" else 1)
        assert results["complete"] is (phase.__name__ == "AutoencoderPhase")
    if results["phase"] == "eval":
        assert results["perplexity"]["words"]["context"] == SEQ_LEN and results["perplexity"]["words"]["value"] > 1
    else:  # a fit leaves a loadable checkpoint, even from a shortened run
        load_compressed(run / "reallm")
    if "adaptive" in results:
        assert results["adaptive"]["bits_per_weight"] <= results["adaptive"]["budget_bits_per_weight"] + 1e-9


# ------------------------------------------------------------------------------------------------
# the format's own options (CompressionConfig.options, one options class per format)
# ------------------------------------------------------------------------------------------------
def _yaml_files() -> list[Path]:
    return sorted((ROOT / "configs").rglob("*.yaml"))


def test_shipped_configs_use_options_not_the_former_flat_keys():
    """No YAML of configs/ names a key that moved into a format's options (in a compression config, an adaptive
    candidate or a sweep parameter), and every preset's compression config (and each candidate, merged as the
    phase merges it) is valid as written."""
    from reallm.model.adaptive import AdaptiveConfig
    from reallm.model.candidates import candidate_configs
    from reallm.weight.config import LEGACY_OPTION_KEYS

    for path in _yaml_files():
        cfg = yaml.safe_load(path.read_text()) or {}
        if "sweeps" in path.parts:
            for key in cfg["parameters"]:
                assert not set(key.split(".")) & set(LEGACY_OPTION_KEYS), f"{path.name}: {key}"
            continue
        init = (cfg.get("model") or {}).get("init_args") or {}
        comp = init.get("compression")
        if comp is None:
            continue
        assert not set(comp) & set(LEGACY_OPTION_KEYS), f"{path.name}: {sorted(set(comp) & set(LEGACY_OPTION_KEYS))}"
        base = CompressionConfig(**comp)
        candidates = (init.get("adaptive") or {}).get("candidates") or {}
        for label, overrides in candidates.items():
            assert not set(overrides) & set(LEGACY_OPTION_KEYS), f"{path.name}: candidate {label}"
        if candidates:
            configs = candidate_configs(base, AdaptiveConfig(candidates=candidates))
            assert set(configs) == set(candidates)


def test_candidates_of_the_reallm_presets_keep_their_meaning():
    """The ReALLM presets' candidates as they were before options moved per format: a VQ candidate (another format
    than the autoencoder base) names its vector length, the small-latent autoencoder merges its network options into
    the base's."""
    from reallm.model.adaptive import AdaptiveConfig
    from reallm.model.candidates import candidate_configs

    expected_dims = {"reallm-3bit": {"vq3": 2, "vq3_unpermuted": 2, "vq4": 2, "vq2": 4},
                     "reallm-2bit": {"vq2": 4, "vq2_unpermuted": 4, "vq2_d2": 2, "vq3": 2, "vq1": 8},
                     "reallm-2bit-lora": {"vq2": 4, "vq2_unpermuted": 4, "vq2_d2": 2, "vq3": 2, "vq1": 8}}
    for preset, dims in expected_dims.items():
        init = yaml.safe_load((ROOT / "configs" / "methods" / f"{preset}.yaml").read_text())["model"]["init_args"]
        base = CompressionConfig(**init["compression"])
        configs = candidate_configs(base, AdaptiveConfig(**init["adaptive"]))
        for label, dim in dims.items():
            c = configs[label]
            assert c.quantizer == "vq" and c.options.dim == dim and c.options.codebook_scope == "model", (preset, label)
            assert (c.rank, c.dora, c.lowrank_dtype) == (base.rank, base.dora, base.lowrank_dtype)
        small = configs["ae_small_latent"].options.to_dict()
        assert small == {**base.options.to_dict(), "n_stages": 3, "latent_channels": 8, "encoder_blocks": 1,
                         "decoder_width": 64, "kernels": [1, 3, 3]}
        assert configs["ae_large_latent"] == base


@pytest.mark.parametrize(("flat", "quantizer", "expected"), [
    ({"vq_dim": 4, "kmeans_iters": 7, "kmeans_tol": 1e-3, "kmeans_init": "random", "kmeans_max_points": None,
      "codebook_scope": "model", "codebooks": 2, "beam": 8, "refine_iters": 10, "autoencoder": None},
     "vq", {"dim": 4, "kmeans_iters": 7, "kmeans_tol": 1e-3, "kmeans_init": "random", "kmeans_max_points": None,
            "codebook_scope": "model"}),
    ({"vq_dim": 8, "kmeans_iters": 7, "kmeans_tol": 1e-3, "kmeans_init": "random", "kmeans_max_points": 4096,
      "codebook_scope": "model", "codebooks": 1, "beam": 2, "refine_iters": 3, "autoencoder": None},
     "additive", {"dim": 8, "codebooks": 1, "beam": 2, "refine_iters": 3, "kmeans_iters": 7, "kmeans_tol": 1e-3,
                  "kmeans_max_points": 4096, "codebook_scope": "model"}),
    ({"vq_dim": 2, "kmeans_iters": 7, "codebook_scope": "model", "codebooks": 2, "beam": 8,
      "autoencoder": {"patch": 32, "n_stages": 1, "kernels": [3]}},
     "autoencoder", {"dim": 2, "patch": 32, "n_stages": 1, "kernels": [3]}),
    ({"vq_dim": 4, "kmeans_iters": 7, "codebook_scope": "model", "autoencoder": None}, "nf", {}),
])
def test_a_flat_legacy_dict_moves_into_the_formats_options(flat, quantizer, expected):
    """The flat form written before options moved per format (checkpoints, results.json): each key goes to the
    field of the format's options that took it over; keys the format never read are dropped."""
    d = {**CompressionConfig(quantizer="nf", bits=2).to_dict(), "quantizer": quantizer, "bits": 2, **flat}
    del d["options"]
    cfg = CompressionConfig.from_dict(d)
    assert cfg.quantizer == quantizer
    got = cfg.options.to_dict()
    assert got.pop("version") == type(cfg.options).version
    defaults = type(cfg.options)().to_dict()
    defaults.pop("version")
    assert got == {**defaults, **expected}
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg  # and the new form round-trips


def test_options_refuse_an_unknown_key_and_a_newer_version():
    with pytest.raises(ValueError, match=r"^invalid compression config: format 'vq' has no option 'dimm'") as e:
        CompressionConfig(quantizer="vq", options={"dimm": 4})
    assert "\n" not in str(e.value) and "its options: dim," in str(e.value)
    with pytest.raises(ValueError, match="format 'nf' has no option 'dim'"):
        CompressionConfig(quantizer="nf", options={"dim": 4})
    newer = {**CompressionConfig(quantizer="vq").to_dict()}
    newer["options"] = {**newer["options"], "version": newer["options"]["version"] + 1}
    with pytest.raises(ValueError, match=r"version 2; this reallm reads up to version 1") as e:
        CompressionConfig.from_dict(newer)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="both options and the former flat keys"):
        CompressionConfig.from_dict({"quantizer": "vq", "vq_dim": 4, "options": {"dim": 4}})


def test_the_python_constructor_takes_no_flat_option_keys():
    with pytest.raises(TypeError, match="vq_dim"):
        CompressionConfig(quantizer="vq", vq_dim=4)  # type: ignore[call-arg]
    cfg = CompressionConfig(quantizer="vq", bits=2, options={"dim": 4, "codebook_scope": "model"})
    assert cfg.with_options(kmeans_iters=5).options.kmeans_iters == 5 and cfg.options.kmeans_iters == 100
    assert cfg.replace(quantizer="nf").options.to_dict() == {"version": 1}
    assert cfg.replace(bits=3).options == cfg.options


def _cli_error(args: list[str], capsys) -> str:
    """The error line of a CLI run that fails while parsing or instantiating (`run=False`: no subcommand)."""
    with pytest.raises(SystemExit) as e:
        cli_main(args, run=False)
    assert e.value.code in (1, 2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("error:"), err
    return err[-1]


@pytest.mark.parametrize("how", ["cli", "yaml"])
def test_a_former_flat_key_is_one_clear_error(how, setup, tmp_path, capsys):
    """`--model.init_args.compression.vq_dim 4` (or `vq_dim:` in a config file), the form of before options moved
    per format, is refused with one line naming the key; `...compression.options.dim 4` is the form now."""
    args = ["--config", str(ROOT / "configs" / "ae.yaml"), "--config",
            str(ROOT / "configs" / "methods" / "vq-3bit.yaml"), "--model.init_args.model_name_or_path",
            str(setup["base"]), *CPU, "--run_dir", str(tmp_path / "run")]
    if how == "cli":
        bad = ["--model.init_args.compression.vq_dim", "4"]
    else:
        (tmp_path / "old.yaml").write_text("model:\n  init_args:\n    compression:\n      vq_dim: 4\n")
        bad = ["--config", str(tmp_path / "old.yaml")]
    message = _cli_error([*args, *bad], capsys)
    assert "'vq_dim' is not accepted" in message and "vq_dim is now options.dim" in message
    assert "has no option 'dimm'" in _cli_error([*args, "--model.init_args.compression.options.dimm", "4"], capsys)
    cli = cli_main([*args, "--model.init_args.compression.options.dim", "4"], run=False)
    comp = cli.model.compression  # the preset's other options are kept: a dotted key is merged into them
    assert (comp.options.dim, comp.options.codebook_scope, comp.options.kmeans_iters) == (4, "model", 100)


def test_python_m_reallm_formats_lists_each_formats_options():
    import dataclasses
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "reallm.formats"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    lines = out.splitlines()
    from reallm.formats import get_codec, names

    for name in names():
        i = next(k for k, line in enumerate(lines) if line.startswith(f"{name} "))
        opts = lines[i + 1].strip()
        cls = get_codec(name).options
        if dataclasses.fields(cls):
            assert opts.startswith(f"options ({cls.__module__}.{cls.__name__}, version {cls.version}):"), opts
        else:
            assert opts == "options: none"
    vq = next(line for line in lines if "VQOptions" in line)
    assert "dim=2" in vq and "kmeans_iters=100" in vq and "codebook_scope='matrix'" in vq
    assert "patch=512" in next(line for line in lines if "AESpec" in line)
    assert "codebooks=2" in next(line for line in lines if "AdditiveOptions" in line)
