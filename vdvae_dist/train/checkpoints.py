"""Where checkpoints go. The loop writes every checkpoint into a fresh local folder
(the update rule's state, the EMA export, each rank's data position) and hands it to a
store: `LocalCheckpoints` for one process, the Ray Train store for workers
(launch/worker.py). Both restore by giving the loop a folder to read.

Local layout: `<folder>/step-XXXXXXXX/` directories, each written under a temporary name
and renamed once complete; only then is `latest` (a one-line file, also replaced
atomically) pointed at it, so a partial write never becomes the checkpoint a run resumes
from."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Protocol

from ..artifacts.storage import replace_file

_NAME = re.compile(r"^step-(\d{8})$")
POINTER = "latest"


class CheckpointStore(Protocol):
    def restore(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> str | None: ...
    def report(self, metrics: dict) -> None: ...


class LocalCheckpoints:
    def __init__(self, folder: str | Path, keep: int, resume: bool = True):
        self.folder, self.keep, self.resume = Path(folder), keep, resume

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
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_dir())


def latest(folder: str | Path) -> Path | None:
    pointer = Path(folder) / POINTER
    if not pointer.is_file():
        return None
    path = Path(folder) / pointer.read_text().strip()
    if not path.is_dir():  # never silently restart a run whose checkpoints cannot be read
        raise ValueError(f"{pointer} names {path.name}, which is not a checkpoint folder (a vdvae-dist older "
                         "than folder checkpoints, or a deleted one); start over in a new train.output")
    return path
