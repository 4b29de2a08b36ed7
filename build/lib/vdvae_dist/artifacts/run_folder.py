"""The one owner of a run's file layout: what `train.output` holds, what a checkpoint
folder holds, and where checkpoints live for one process and under Ray Train. The loop,
the Ray driver and workers, both update rules, the weights loader and the importer name
files only through this module.

    train.output/
      ema_fp32.pt  samples.png  summary.json    published by rank 0 at the end of a run
      metrics.jsonl                             one row per logged step (local outputs only)
      failed.json                               why Ray workers stopped without a retry
      checkpoints/step-XXXXXXXX/  latest        `vdvae-dist train` (LocalCheckpoints)
      ray/<run name>/checkpoint_<time>/         `vdvae-dist launch` (Ray Train's storage)

    a checkpoint folder (either form):
      config.json                               the run's config (rank 0; URLs redacted)
      ema_fp32.pt                               the full fp32 EMA export (rank 0)
      data-rankNNNNN.json                       each rank's data position
      state.pt                                  plain-torch rule: weights, optimizer, EMA, counters
      zero/  ema-rankNNNNN.pt  layout.json      DeepSpeed rule: ZeRO shards, EMA shards, stage/world
      complete-rankNNNNN.json                   written by each rank after all its other files

Local checkpoints are written under a temporary name and renamed once complete; only then
is `latest` (a one-line file, also replaced atomically) pointed at them, so a partial write
never becomes the checkpoint a run resumes from. Under Ray Train a folder counts only
when every rank's completion marker is there (Ray uploads each rank's files separately)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from .storage import join, replace_file, to_fs

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig

# train.output
EXPORT_NAME = "ema_fp32.pt"  # also in every checkpoint folder and in the run's MLflow model
SAMPLES_FILE = "samples.png"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
FAILURE_FILE = "failed.json"
LOCAL_CHECKPOINTS = "checkpoints"
RAY_STORAGE = "ray"
POINTER = "latest"  # in the local checkpoints folder: the name of the newest complete checkpoint

# a checkpoint folder
CONFIG_FILE = "config.json"
TORCH_STATE_FILE = "state.pt"
ZERO_TAG = "zero"
ZERO_LAYOUT_FILE = "layout.json"

_STEP_FOLDER = re.compile(r"^step-(\d{8})$")


def data_file(rank: int) -> str:
    return f"data-rank{rank:05d}.json"


def complete_file(rank: int) -> str:
    return f"complete-rank{rank:05d}.json"


def ema_shard_file(rank: int) -> str:
    return f"ema-rank{rank:05d}.pt"


# -- what every rank writes into a checkpoint folder, and reads back -----------------------
def write_rank_files(folder: Path, rank: int, world: int, step: int, config: dict, data_state: dict) -> None:
    """After the update rule's own files: the config (rank 0), this rank's data position,
    then its completion marker, last."""
    if rank == 0:
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (folder / data_file(rank)).write_text(json.dumps(data_state))
    (folder / complete_file(rank)).write_text(json.dumps({"world": world, "step": step}))


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {folder} has no {CONFIG_FILE} (written by an older vdvae-dist); "
                         "start over in a new train.output")
    return json.loads(path.read_text())


def read_data_state(folder: str | Path, rank: int) -> dict | None:
    path = Path(folder) / data_file(rank)
    return json.loads(path.read_text()) if path.exists() else None


def check_model_config(saved: dict, cfg: RunConfig, where: str) -> None:
    """Refuse to resume a checkpoint of another model (the tensors would not fit)."""
    from ..config import to_dict

    saved, now = saved["model"], to_dict(cfg)["model"]
    if saved != now:
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        raise ValueError(f"checkpoint {where} was trained with a different model config (model."
                         f"{', model.'.join(changed)}); use a new train.output, start over, or resume with the "
                         "config it was trained with")


def changed_training(saved: dict, cfg: RunConfig) -> list[str]:
    """The optim.* and loss.* keys whose values differ from the checkpoint's config (a resume
    with other schedules is allowed, but said); optim.total_steps may grow silently."""
    from ..config import to_dict

    now = to_dict(cfg)
    return [f"{section}.{key}" for section in ("optim", "loss")
            for key in sorted(saved.get(section, {}).keys() | now[section].keys())
            if saved.get(section, {}).get(key) != now[section].get(key) and key != "total_steps"]


def is_complete(fs, folder: str) -> bool:
    """Every rank of the world that wrote the checkpoint left its completion marker."""
    marker = join(folder, complete_file(0))
    if not fs.exists(marker):
        return False
    world = int(json.loads(fs.cat_file(marker))["world"])
    return all(fs.exists(join(folder, complete_file(r))) for r in range(1, world))


def load_torch_state(folder: str | Path, device: torch.device | str = "cpu") -> dict:
    """A plain-torch checkpoint's full training state (weights-only unpickling)."""
    import torch

    path = Path(folder) / TORCH_STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {str(folder)!r} holds no {TORCH_STATE_FILE}")
    return torch.load(path, map_location=device, weights_only=True)


# -- where checkpoints go ------------------------------------------------------------------
class CheckpointStore(Protocol):
    """What the loop writes checkpoints through: `LocalCheckpoints` for one process, the
    Ray Train store for workers (launch/worker.py). Both restore by giving a folder."""

    def restore(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> str | None: ...
    def report(self, metrics: dict) -> None: ...


class LocalCheckpoints:
    def __init__(self, folder: str | Path, keep: int, resume: bool = True):
        self.folder, self.keep, self.resume = Path(folder), keep, resume

    @classmethod
    def of_run(cls, output: str, keep: int, resume: bool = True) -> "LocalCheckpoints":
        return cls(Path(output) / LOCAL_CHECKPOINTS, keep, resume)

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        yield latest(self.folder) if self.resume else None

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.folder))
        try:
            write(tmp)
            if final.exists():  # the same step again: set the old copy aside until the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=self.folder))
                os.replace(final, old / final.name)
            os.replace(tmp, final)
            os.utime(final)  # retention goes by write time (below)
        finally:
            for leftover in (tmp, *self.folder.glob(f".{final.name}.old-*")):
                if leftover.exists():
                    shutil.rmtree(leftover)
        replace_file(str(self.folder / POINTER), final.name.encode() + b"\n")
        # keep the most recently written, not the highest steps: a folder may hold an earlier
        # run's higher-step checkpoints (--no-resume), and the one just written always stays
        by_write = sorted(list_checkpoints(self.folder), key=lambda p: p.stat().st_mtime_ns)
        for old in by_write[:-self.keep]:
            if old != final:
                shutil.rmtree(old)
        return str(final)

    def report(self, metrics: dict) -> None:
        return None  # metrics go to the progress line and metrics.jsonl


def list_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _STEP_FOLDER.match(p.name) and p.is_dir())


def latest(folder: str | Path) -> Path | None:
    pointer = Path(folder) / POINTER
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    if not path.is_dir():  # never silently restart a run whose checkpoints cannot be read
        raise ValueError(f"{pointer} names {path.name}, which is not a checkpoint folder (a vdvae-dist older "
                         "than folder checkpoints, or a deleted one); start over in a new train.output")
    return path


def ray_storage_path(cfg: RunConfig) -> str:
    out = cfg.train.output
    return out.rstrip("/") + "/" + RAY_STORAGE if "://" in out else str(Path(out).resolve() / RAY_STORAGE)


def ray_run_name(cfg: RunConfig) -> str:
    return Path(cfg.train.output.rstrip("/")).name or "vdvae"


def latest_ray_checkpoint(cfg: RunConfig) -> str | None:
    """Newest complete checkpoint folder of this run under Ray Train's storage (falling back
    past incomplete ones), or None."""
    base = join(ray_storage_path(cfg), ray_run_name(cfg))
    fs, root = to_fs(base)
    if not fs.exists(root):
        return None
    found = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint_"))
    for folder in reversed(found):
        if is_complete(fs, folder):
            return folder if "://" not in base else base.split("://")[0] + "://" + folder
    return None
