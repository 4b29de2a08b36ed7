"""Rank 0's console as a file for the MLflow run (`logs/console-rank0-<start>.log`): what the
process writes to stdout and stderr while its run is open also goes to a local file, which
the tracker logs when the run ends, so a run's page keeps what its driver's terminal showed."""
from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TextIO


class _Tee:
    """A text stream that writes to the stream it replaces and to the log file."""

    def __init__(self, stream: TextIO, file: TextIO, lock: threading.Lock):
        self._stream, self._file, self._lock = stream, file, lock

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        with self._lock:
            if not self._file.closed:
                self._file.write(text)
        return n

    def flush(self) -> None:
        self._stream.flush()
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the replaced stream's
        return getattr(self._stream, name)


class ConsoleLog:
    """Copies sys.stdout and sys.stderr into a temporary file named `name` until close()."""

    def __init__(self, name: str):
        self._lock = threading.Lock()
        self.path = Path(tempfile.mkdtemp(prefix="vdvae-console-")) / name
        self._file = open(self.path, "w", encoding="utf-8", errors="replace")
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self._file, self._lock)
        sys.stderr = _Tee(sys.stderr, self._file, self._lock)

    def close(self) -> Path:
        """Stop copying (the streams are restored unless something replaced them since) and
        return the file; safe to call twice."""
        for name, saved in zip(("stdout", "stderr"), self._saved):
            current = getattr(sys, name)
            if isinstance(current, _Tee) and current._file is self._file:
                setattr(sys, name, saved)
        with self._lock:
            if not self._file.closed:
                self._file.close()
        return self.path

    def remove(self) -> None:
        """Delete the file (after close)."""
        shutil.rmtree(self.path.parent, ignore_errors=True)
