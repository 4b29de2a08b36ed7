"""Build a RunConfig from a preset, a TOML/YAML file and `--set key=value` overrides.

Precedence (later wins): defaults < preset < file < overrides. Unknown keys and
badly typed values raise ValueError naming the dotted key (validate.py).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .schema import RunConfig
from .validate import validate

PRESET_DIR = "presets"


def available_presets() -> list[str]:
    files = resources.files(__package__).joinpath(PRESET_DIR).iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def preset_dict(name: str) -> dict[str, Any]:
    names = available_presets()
    if name not in names:
        raise ValueError(f"preset={name!r} is unknown; allowed: {', '.join(names)}")
    text = resources.files(__package__).joinpath(PRESET_DIR, f"{name}.toml").read_text()
    return tomllib.loads(text)


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
        return data
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"config file {str(path)!r}: suffix must be .toml, .yaml, .yml or .json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=2e-4` -> (["optim", "lr"], 2e-4). Values are parsed as TOML values,
    falling back to a bare string (`data.source=folder:/x` works without quotes)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and not (
                _is_res_map(value) or (not value and _is_res_map(out[key]))):  # {} empties a res map
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _is_res_map(value: Mapping) -> bool:
    # {resolution: n} tables replace the default wholesale instead of merging key by key
    return len(value) > 0 and all(str(k).isdigit() for k in value)


def load(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    raw: dict[str, Any] = dict(base or {})
    if preset is not None:
        raw = merge(raw, preset_dict(preset))
        raw["preset"] = preset
    if path is not None:
        file_data = read_file(path)
        if "preset" in file_data and preset is None:
            raw = merge(preset_dict(file_data["preset"]), raw)
        raw = merge(raw, file_data)
    for item in overrides:
        keys, value = parse_override(item)
        update: dict[str, Any] = {keys[-1]: value}
        for k in reversed(keys[:-1]):
            update = {k: update}
        raw = merge(raw, update)
    return from_dict(raw)


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    return validate(raw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable dict (int keys of resolution maps become strings)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def dumps(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{v!r} has no TOML form here")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"{v!r} has no TOML form here")


def dumps_toml(cfg: RunConfig, header: str = "") -> str:
    """The complete config as a TOML file that `load(path=...)` reads back to the same config."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    sections = []
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):
            sections.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in sections:
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def flatten(cfg: RunConfig) -> dict[str, str]:
    """Dotted key -> string value (MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and not _is_res_map(value):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)

    walk("", to_dict(cfg))
    return out
