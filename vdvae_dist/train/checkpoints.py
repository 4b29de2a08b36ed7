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

_NAME = re.compile(r"^step-(\d{8})$")
POINTER = "latest"


class CheckpointStore(Protocol):
    def restore(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> str | None: ...
    def report(self, metrics: dict) -> None: ...


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
            if final.exists():  # the same step written again (e.g. a resumed run's first save)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        replace_file(self.folder / POINTER, final.name.encode() + b"\n")
        for old in list_checkpoints(self.folder)[:-self.keep]:
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
    return path if path.is_dir() else None
