"""Atomic checkpoints on the local filesystem.

A checkpoint is one file `step-XXXXXXXX.pt` written to a temporary name, fsynced and
renamed; only then is `latest` (a one-line text file, also replaced atomically) pointed
at it, so a partial write never becomes the checkpoint a run resumes from. Loading uses
weights_only=True: no arbitrary unpickling.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_file(path: str | Path, state: dict) -> Path:
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def save(folder: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(folder / "latest", lambda f: f.write(path.name.encode() + b"\n"))
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def latest(folder: str | Path) -> Path | None:
    pointer = Path(folder) / "latest"
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    return path if path.is_file() else None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)
