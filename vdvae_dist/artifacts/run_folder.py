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
      complete-rankNNNNN.json                   each rank's completion marker: its files and sizes
    train.output/.lock                          the running run's owner (output_lock.py; local outputs)

Every rank's completion marker is written last, once all its other files are in place,
and lists those files with their sizes: a folder counts only when every rank's marker is
there and every file a marker lists is there with its size. Local checkpoints are written
under a temporary name, every file and folder fsynced, the marker written and fsynced, and
only then renamed and pointed at by `latest` (a one-line file, also replaced atomically).
Under Ray Train each rank's files are uploaded first and its marker after them, in a step of
its own (launch/worker.py): Ray's upload copies files in no set order."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from .storage import join, redact, replace_file, to_fs

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
LOCK_FILE = ".lock"  # the running run's host and pid (output_lock.py)

# a checkpoint folder
CONFIG_FILE = "config.json"
TORCH_STATE_FILE = "state.pt"
ZERO_TAG = "zero"
ZERO_LAYOUT_FILE = "layout.json"

_STEP_FOLDER = re.compile(r"^step-(\d{8})$")
_MARKER = re.compile(r"^complete-rank\d{5}\.json$")


def data_file(rank: int) -> str:
    return f"data-rank{rank:05d}.json"


def complete_file(rank: int) -> str:
    return f"complete-rank{rank:05d}.json"


def ema_shard_file(rank: int) -> str:
    return f"ema-rank{rank:05d}.pt"


# -- what every rank writes into a checkpoint folder, and reads back -----------------------
def write_rank_files(folder: Path, rank: int, world: int, step: int, config: dict, data_state: dict) -> None:
    """After the update rule's own files: the config (rank 0) and this rank's data position.
    The completion marker is not written here: the store writes it last (marker_bytes)."""
    if rank == 0:
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (folder / data_file(rank)).write_text(json.dumps(data_state))


def marker_bytes(folder: Path, rank: int, world: int, step: int) -> bytes:
    """This rank's completion marker for the files it wrote under `folder`: every file
    (relative path -> size in bytes), so a reader can tell a folder some of whose files never
    arrived from a complete one."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(Path(folder).rglob("*"))
             if p.is_file() and not _MARKER.match(p.name)}
    return json.dumps({"rank": rank, "world": world, "step": step, "files": files}).encode()


def fsync_tree(folder: Path) -> None:
    """Local disk: every file under `folder`, then every folder (deepest first), reaches the
    disk, so a crash after the marker cannot leave a marker beside lost data."""
    folder = Path(folder)
    folders = [folder]
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            folders.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted(folders, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def fsync_dir(folder: str | Path) -> None:
    """The folder's entries (new names, renames) reach the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker_local(folder: Path, rank: int, world: int, step: int) -> None:
    """Local disk: fsync what this rank wrote, then its marker, then the folder."""
    folder = Path(folder)
    data = marker_bytes(folder, rank, world, step)
    fsync_tree(folder)
    with open(folder / complete_file(rank), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


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


def incomplete(fs, folder: str) -> str | None:
    """Why the checkpoint folder is not complete (a rank's marker missing, a listed file
    missing or of another size), or None when it is: every rank of the world that wrote it
    left its marker, and every file a marker lists is there with its size."""
    marker = join(folder, complete_file(0))
    if not fs.exists(marker):
        return f"no completion marker {complete_file(0)} (the checkpoint was never finished)"
    world = int(json.loads(fs.cat_file(marker))["world"])
    markers = {}
    for r in range(world):
        path = join(folder, complete_file(r))
        if not fs.exists(path):
            return f"no completion marker {complete_file(r)} of rank {r} (of {world} ranks)"
        markers[r] = json.loads(fs.cat_file(path))
    root = fs.info(folder)["name"].rstrip("/")  # as find() spells it (absolute, no scheme)
    sizes = {path[len(root) + 1:]: info.get("size") for path, info in fs.find(root, detail=True).items()}
    for r, m in markers.items():
        for name, size in (m.get("files") or {}).items():  # markers before file lists: none to check
            if name not in sizes:
                return f"{name} (listed by rank {r}'s marker) is missing"
            if sizes[name] != size:
                return f"{name} has {sizes[name]} bytes; rank {r}'s marker lists {size}"
    return None


def is_complete(fs, folder: str) -> bool:
    return incomplete(fs, folder) is None


def check_resumable(url: str, cfg: RunConfig) -> None:
    """Before any worker starts (launch): the checkpoint at `url` is complete and was
    trained with this model config; ValueError naming what is missing or which fields differ."""
    fs, path = to_fs(url)
    if not fs.isdir(path):
        raise ValueError(f"--resume {redact(url)}: not a checkpoint folder (it does not exist); allowed: a "
                         f"checkpoint folder holding {complete_file(0)}, or 'latest'")
    why = incomplete(fs, path)
    if why is not None:
        raise ValueError(f"--resume {redact(url)}: the checkpoint is incomplete: {why}; resume from a complete one "
                         "('latest' passes over incomplete checkpoints)")
    config = join(path, CONFIG_FILE)
    if not fs.exists(config):
        raise ValueError(f"--resume {redact(url)}: the checkpoint has no {CONFIG_FILE} (written by an older "
                         "vdvae-dist); start over in a new train.output")
    check_model_config(json.loads(fs.cat_file(config)), cfg, redact(url))


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
    def __init__(self, folder: str | Path, keep: int, resume: bool = True, log: Callable[[str], None] = print):
        self.folder, self.keep, self.resume, self.log = Path(folder), keep, resume, log

    @classmethod
    def of_run(cls, output: str, keep: int, resume: bool = True,
               log: Callable[[str], None] = print) -> "LocalCheckpoints":
        return cls(Path(output) / LOCAL_CHECKPOINTS, keep, resume, log)

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        yield latest(self.folder, self.log) if self.resume else None

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.folder))
        try:
            write(tmp)
            write_marker_local(tmp, 0, 1, step)  # last: after every other file reached the disk
            if final.exists():  # the same step again: set the old copy aside until the new one is in place
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=self.folder))
                os.replace(final, old / final.name)
            os.replace(tmp, final)
            os.utime(final)  # retention goes by write time (below)
            fsync_dir(self.folder)  # the rename, before `latest` names it
        finally:
            for leftover in (tmp, *self.folder.glob(f".{final.name}.old-*")):
                if leftover.exists():
                    shutil.rmtree(leftover)
        replace_file(str(self.folder / POINTER), final.name.encode() + b"\n")
        fsync_dir(self.folder)
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


def latest(folder: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """The checkpoint `latest` names, or, when that one is gone or incomplete, the most
    recently written complete one, with a warning naming the one passed over. None when
    nothing was ever checkpointed; an error when `latest` exists but no complete checkpoint
    does (never silently restart a run whose checkpoints cannot be read)."""
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    pointer = Path(folder) / POINTER
    named = Path(folder) / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named.is_dir() and is_complete(fs, str(named)):
        return named
    newest_first = sorted(list_checkpoints(folder), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    fallback = next((p for p in newest_first if p != named and is_complete(fs, str(p))), None)
    if named is None:
        return fallback  # a crash before the first `latest`: the folder it renamed is complete
    why = "missing" if not named.is_dir() else f"incomplete ({incomplete(fs, str(named))})"
    if fallback is None:
        raise ValueError(f"{pointer} names {named.name}, which is {why}, and no other complete checkpoint is in "
                         f"{folder}; start over in a new train.output (or with --no-resume)")
    warn(f"warning: checkpoint {named} is {why}; resuming from the older complete checkpoint {fallback.name}")
    return fallback


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
