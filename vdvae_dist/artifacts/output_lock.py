"""One run at a time per train.output: a lock file created exclusively (O_EXCL) holding the
owner's host, pid and process start time, removed when the run ends. Two runs writing one
output would interleave checkpoints, `latest`, metrics.jsonl and the published weights.

A lock whose owner is gone is stale and taken over, with a warning: on this host, when its
pid no longer runs (or now belongs to a process started at another time). A lock of another
host cannot be checked from here: the error names it and says how to remove it.
Object-storage outputs (s3://, gs://) are not locked: their stores offer no exclusive create
through fsspec here; docs/reliability.md says so."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .run_folder import LOCK_FILE


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


def owner() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(o: dict) -> str:
    if not o:
        return "owner unknown: the lock file is empty or unreadable"
    return f"pid {o.get('pid')} on host {o.get('host')!r}, since {o.get('since')}"


def _stale(o: dict) -> bool:
    """Provably gone: same host, and its pid no longer runs as the same process."""
    return o.get("host") == socket.gethostname() and not _running(int(o.get("pid", 0)), o.get("started"))


def _create(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except ValueError:  # a lock being written this instant, or a torn one
        return {}


def acquire(output: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """Lock `output` (a local folder) for this process; the lock's path. ValueError naming
    the other run when a live one holds it. Object storage: None (not locked)."""
    if "://" in str(output) and not str(output).startswith("file://"):
        return None
    folder = Path(str(output).removeprefix("file://"))
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK_FILE, owner()
    for _ in range(3):  # a stale lock taken over, or one released meanwhile, then create again
        if _create(path, me):
            return path
        held = _read(path)
        if held == {}:  # just created by another process, and not yet written
            time.sleep(0.5)
            held = _read(path)
        if held is None:
            continue  # released between our create and read
        if not held or not _stale(held):
            raise ValueError(f"train.output={output} is in use by another run ({_describe(held)}; lock file {path}); "
                             "wait for it to finish or use another train.output. If that run is gone (e.g. its "
                             f"machine crashed), delete {path}")
        # stale: move it aside under a unique name; only the process whose rename took the
        # stale one goes on (a rename that took a fresh lock puts it back)
        aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            taken = _read(aside)
            if taken != held:
                os.rename(aside, path)
                continue
            aside.unlink()
            warn(f"warning: took over the lock of {output} from a run that is gone ({_describe(held)})")
    raise ValueError(f"train.output={output}: could not take the lock {path} (other runs keep starting there)")


def release(path: Path | None) -> None:
    """Remove the lock if it is still this process's."""
    if path is None:
        return
    held = _read(path)
    if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def locked(output: str | Path, warn: Callable[[str], None] = print) -> Iterator[Path | None]:
    path = acquire(output, warn)
    try:
        yield path
    finally:
        release(path)
