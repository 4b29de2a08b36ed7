"""One run per train.output: a second run is refused naming the first (host and pid), a
lock whose process is gone is taken over with a warning, one of another host is refused."""
import json
import socket
import subprocess
import sys

import pytest

from vdvae_dist.artifacts import output_lock
from vdvae_dist.artifacts.run_folder import LOCK_FILE
from vdvae_dist.config import load


def _lock_of(pid: int, host: str | None = None) -> str:
    return json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": output_lock._start_time(pid),
                       "since": "2026-12-03T09:00:00Z"})


@pytest.fixture
def other_process():
    """A live process of this host, as another run's driver would be."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_until_the_first_is_gone(tmp_path, other_process):
    (tmp_path / LOCK_FILE).write_text(_lock_of(other_process.pid))
    with pytest.raises(ValueError, match=rf"train.output={tmp_path} is in use by another run \(pid "
                                         rf"{other_process.pid} on host '{socket.gethostname()}'"):
        output_lock.acquire(tmp_path)
    other_process.kill()
    other_process.wait()
    said = []
    path = output_lock.acquire(tmp_path, said.append)  # its process is gone: stale
    assert said == [f"warning: took over the lock of {tmp_path} from a run that is gone (pid {other_process.pid} on "
                    f"host '{socket.gethostname()}', since 2026-12-03T09:00:00Z)"]
    assert json.loads(path.read_text())["pid"] == output_lock.os.getpid()
    with pytest.raises(ValueError, match="in use by another run"):  # held, by this process now
        output_lock.acquire(tmp_path)
    output_lock.release(path)
    assert not path.exists()


def test_a_lock_of_another_host_is_refused_naming_it(tmp_path):
    (tmp_path / LOCK_FILE).write_text(_lock_of(1, host="gpu-node-7"))
    with pytest.raises(ValueError, match=r"pid 1 on host 'gpu-node-7'.*If that run is gone .* delete"):
        output_lock.acquire(tmp_path)


def test_object_storage_outputs_are_not_locked(tmp_path):
    assert output_lock.acquire("s3://bucket/run") is None


def test_train_refuses_an_output_another_run_holds(tmp_path, other_process):
    from vdvae_dist.train.local import train_local

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(_lock_of(other_process.pid))
    with pytest.raises(ValueError, match="is in use by another run"):
        train_local(load("tiny", overrides=[f"train.output={out}", "optim.total_steps=1"]), log=lambda *_: None)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == other_process.pid  # the other run's lock stays
