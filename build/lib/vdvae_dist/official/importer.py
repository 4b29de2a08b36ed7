"""`vdvae-dist import`: an official checkpoint -> our export (`ema_fp32.pt`).

Efficient-VDVAE checkpoints are dicts holding `model_state_dict` and
`ema_model_state_dict`; openai/vdvae publishes plain state dicts (`*-model-ema.th`, and
`*-model.th` whose keys carry DistributedDataParallel's `module.` prefix). The network
comes from the official hyperparameters (`--hparams`: a JSON file of their values or an
Efficient-VDVAE .cfg), from openai's named set (`--hps`), or, for Efficient-VDVAE, from
the paper preset whose shapes the checkpoint has. Loading is weights-only.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts.run_folder import EXPORT_NAME
from ..artifacts.storage import redact, require_bucket, storage_errors, to_fs, write_atomic
from ..artifacts.weights import save_export
from ..config import available_presets, dumps_toml, from_dict
from ..config.load import preset_dict
from ..config.validate import model_layout
from ..model import build_model, misfit
from . import hparams as official

SOURCES = ("efficient-vdvae", "vdvae")
VDVAE_SETS = ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024")  # openai's --hps names
# Efficient-VDVAE's dataset_source and resolution -> our preset (data settings to keep)
_EVD_PRESETS = {("cifar-10", 32): "cifar10", ("imagenet", 32): "imagenet32", ("imagenet", 64): "imagenet64",
                ("celebA", 64): "celeba64", ("ffhq", 1024): "ffhq1024", ("binarized_mnist", 32): "mnist"}
_VDVAE_PRESETS = {"cifar10": "vdvae-cifar10", "imagenet32": "vdvae-imagenet32", "imagenet64": "vdvae-imagenet64",
                  "ffhq_256": "vdvae-ffhq256", "ffhq_1024": "vdvae-ffhq1024"}


CONFIG_NAME = "config.toml"  # beside the export of a folder import: the whole run config


@dataclass
class Imported:
    out: str  # URI of the written export
    preset: str  # preset the config was based on
    weights: str  # which weight set was taken ("ema" or "model")
    parameters: int
    config: str | None = None  # URI of the written config.toml (folder imports)


def _read(uri: str) -> bytes:
    fs, path = to_fs(uri)
    with storage_errors(uri):
        if not fs.isfile(path):
            raise ValueError(f"--checkpoint {uri!r} does not exist; allowed: a file on a path, file://, s3:// or gs://")
        return fs.cat_file(path)


def _torch_load(data: bytes, uri: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than tensors and plain values
        raise ValueError(f"--checkpoint {uri!r} is not a weights-only torch file: {e}") from e


def pick_state(source: str, saved, uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to import and which set it is; EMA weights when present."""
    if not isinstance(saved, dict):
        raise ValueError(f"--checkpoint {uri!r} holds a {type(saved).__name__}, not a state dict")
    if source == "efficient-vdvae":
        for key, name in (("ema_model_state_dict", "ema"), ("model_state_dict", "model")):
            if isinstance(saved.get(key), dict):
                return saved[key], name
        raise ValueError(f"--checkpoint {uri!r} has no ema_model_state_dict or model_state_dict "
                         f"(keys: {', '.join(map(str, list(saved)[:6]))}); is it an Efficient-VDVAE checkpoint?")
    if not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ValueError(f"--checkpoint {uri!r} is not a plain state dict; openai/vdvae publishes "
                         "*-model-ema.th (EMA) and *-model.th files")
    prefixed = all(str(k).startswith("module.") for k in saved)
    if prefixed:  # saved through DistributedDataParallel: the training weights
        return {k[len("module."):]: v for k, v in saved.items()}, "model"
    return dict(saved), "ema"


def read_hparams(path: str) -> dict:
    text = Path(path).read_text() if Path(path).is_file() else None
    if text is None:
        raise ValueError(f"--hparams {path!r} does not exist")
    if path.endswith(".cfg"):
        return official.read_evd_cfg(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--hparams {path!r} is neither JSON nor an Efficient-VDVAE .cfg file: {e}") from None


def _config_from_hparams(source: str, hp: dict) -> tuple[dict, str]:
    """(our run config dict, base preset) for official hyperparameters."""
    if source == "efficient-vdvae":
        if "model" not in hp or "data" not in hp:
            raise ValueError("--hparams: Efficient-VDVAE hyperparameters need the sections 'data' and 'model'")
        model = official.evd_model_config(hp)
        data = hp["data"]
        preset = _EVD_PRESETS.get((data.get("dataset_source"), int(data["target_res"])))
        if data.get("dataset_source") == "ffhq" and int(data["target_res"]) == 256:
            preset = "ffhq256-5bit" if int(data["num_bits"]) == 5 else "ffhq256"
        training = official.evd_training_config(hp)
    else:
        model = official.vdvae_model_config(hp)
        preset = _VDVAE_PRESETS[hp.get("dataset", "cifar10")]
        training = official.vdvae_training_config(hp)
    base = preset_dict(preset) if preset else {}
    raw = {**base, "preset": preset or "imported", "model": model}
    for section, table in training.items():  # the official training, over the preset's
        raw[section] = {**base.get(section, {}), **table}
    raw["data"] = {**base.get("data", {}), "resolution": model["resolution"] - 2 * model["pad"]}
    return raw, preset or "imported"


def _prefixes(source: str, cfg) -> dict[str, str]:
    layout = model_layout(cfg.model)
    if source == "efficient-vdvae":
        return official.evd_key_prefixes(layout)
    return official.vdvae_key_prefixes(layout, cfg.model.no_bias_above)


def _fits(source: str, state: dict, raw: dict) -> tuple[object, dict, str | None]:
    cfg = from_dict(raw)
    renamed = official.rename(state, _prefixes(source, cfg))
    with torch.device("meta"):  # shapes only
        problem = misfit(renamed, build_model(cfg.model))
    return cfg, renamed, problem


def _match_preset(source: str, state: dict) -> tuple[dict, str]:
    """The paper preset whose network has exactly the checkpoint's keys and shapes."""
    design = "efficient" if source == "efficient-vdvae" else "original"
    problems = []
    for name in available_presets():
        raw = preset_dict(name)
        if raw.get("model", {}).get("design", "efficient") != design or name in ("tiny", "mnist-small"):
            continue
        raw["preset"] = name
        _, _, problem = _fits(source, state, raw)
        if problem is None:
            return raw, name
        problems.append(f"{name}: {problem}")
    raise ValueError("the checkpoint matches no paper preset; pass the official hyperparameters with --hparams. "
                     + "; ".join(problems))


def import_checkpoint(source: str, checkpoint: str, out: str, hparams: str | None = None,
                      hps: str | None = None) -> Imported:
    if source not in SOURCES:
        raise ValueError(f"--from={source!r} is unknown; allowed: {' | '.join(SOURCES)}")
    if hps is not None and (source != "vdvae" or hps not in VDVAE_SETS):
        raise ValueError(f"--hps={hps!r}: allowed with --from vdvae: {' | '.join(VDVAE_SETS)}")
    state, weights = pick_state(source, _torch_load(_read(checkpoint), checkpoint), checkpoint)
    if hparams is not None:
        raw, preset = _config_from_hparams(source, read_hparams(hparams))
        against = f"the network of --hparams {hparams}"
    elif hps is not None:
        preset = f"vdvae-{hps}"
        raw = {**preset_dict(preset), "preset": preset}
        against = f"preset {preset}"
    elif source == "vdvae":
        raise ValueError("--from vdvae needs --hps NAME (" + " | ".join(VDVAE_SETS) + ") or --hparams FILE")
    else:
        raw, preset = _match_preset(source, state)
        against = f"preset {preset}"
    cfg, renamed, problem = _fits(source, state, raw)
    if problem is not None:
        raise ValueError(f"--checkpoint {checkpoint!r} does not fit {against}: {problem}")
    model = build_model(cfg.model)
    model.load_state_dict(renamed, strict=True)
    ema = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    fs, path = to_fs(out)
    target, config = out, None
    with storage_errors(out):
        require_bucket(fs, path, out)
        buf = io.BytesIO()
        save_export(buf, cfg, ema, 0, {"imported_from": source, "imported_weights": weights})
        if out.endswith(".pt"):
            write_atomic(fs, path, buf.getvalue())
        else:  # a folder: the export under its usual name, and the run config to train on from it
            root = path.rstrip("/")
            target, config = f"{out.rstrip('/')}/{EXPORT_NAME}", f"{out.rstrip('/')}/{CONFIG_NAME}"
            header = (f"vdvae-dist import --from {source} {checkpoint}"
                      + (f" --hparams {hparams}" if hparams else "") + (f" --hps {hps}" if hps else "")
                      + f"\nThe whole run config, {against}. Fine-tune from the imported weights with\n"
                      + f"  vdvae-dist train --config {config} --set train.init_from={out.rstrip('/')}")
            write_atomic(fs, f"{root}/{EXPORT_NAME}", buf.getvalue())
            write_atomic(fs, f"{root}/{CONFIG_NAME}", dumps_toml(cfg, redact(header)).encode())
    return Imported(target, preset, weights, sum(v.numel() for v in model.parameters()), config)

