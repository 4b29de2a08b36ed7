"""The main job's console shows the project's lines; these are the stack's lines that say
nothing a user can act on, dropped unless --verbose. Each is matched exactly, so anything
else the stack says (its real warnings and errors) still shows.

- Ray Train V2 logs every report and checkpoint at INFO;
- torch warns once per worker that DeepSpeed uses a deprecated collective;
- DeepSpeed warns that the project's own torch optimizer is "untested" under ZeRO (the
  project's tests are what test it: tests/integration/test_engine.py), that a machine without
  a GPU trains on the CPU (the run's first line says which device it uses), and prints a
  line each time its CPU communication op loads;
- Ray Train's preemption watcher, on a Ray instance this process started (one machine: no
  node can be preempted), only adds Ray's "max_restarts" error line (ray issue 53727).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from ..core.ray_private import train_report_loggers

# matched against DeepSpeed's log records, and the root logger's: Ray Train sends a worker's
# print() there, DeepSpeed's "built successfully" included
STACK_NOISE = re.compile(r"You are using ZeRO with an untested optimizer|Setting accelerator to CPU"
                         r"|^DeepSpeed \S+ built successfully$")
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train's controller


class _DropStackNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not STACK_NOISE.search(record.getMessage())


class _DropNoiseLines:
    """sys.stdout without STACK_NOISE's lines: Ray Train's print() writes to the stream as
    well as the root logger when a Ray worker's sys.stdout is not the original one."""

    def __init__(self, stream):
        self._stream, self._pending = stream, ""

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        kept = [line for line in lines if not STACK_NOISE.search(line)]
        if kept:
            self._stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not STACK_NOISE.search(self._pending):
            self._stream.write(self._pending)
        self._pending = ""
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def quiet_deepspeed_logs(*names: str) -> None:
    """Install the filter on DeepSpeed's logger (before or after deepspeed is imported) and
    on the named ones ("" is the root logger)."""
    for name in ("DeepSpeed", *names):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStackNoise) for f in logger.filters):
            logger.addFilter(_DropStackNoise())


def quiet_worker_console() -> None:
    """In a training worker: every filter above."""
    for logger in train_report_loggers():
        logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    quiet_deepspeed_logs("")
    if not isinstance(sys.stdout, _DropNoiseLines):
        sys.stdout = _DropNoiseLines(sys.stdout)


def without_preemption_watcher_here() -> None:
    """Before ray.init may start a local instance: its controller inherits this environment
    (a cluster joined instead keeps its own; a value the user set is kept)."""
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
