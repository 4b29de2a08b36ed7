"""The driver: `--resume latest` picks the newest checkpoint every rank finished writing, falling back
past one whose other ranks' files never arrived (real folders as Ray Train lays them out)."""
import json

import pytest

from vdvae_dist.config import load, to_dict
from vdvae_dist.artifacts.run_folder import complete_file
from vdvae_dist.artifacts.run_folder import latest_ray_checkpoint as latest_checkpoint
from vdvae_dist.artifacts.run_folder import ray_run_name as run_name
from vdvae_dist.artifacts.run_folder import ray_storage_path as storage_path


def test_an_incomplete_newest_checkpoint_is_passed_over(tmp_path):
    cfg = load("tiny", overrides=[f"train.output={tmp_path / 'run'}"])
    root = tmp_path / "run" / "ray" / run_name(cfg)
    assert storage_path(cfg) == str(root.parent)
    for name, ranks in (("checkpoint_2026-01-01_00-00-01", [0, 1]), ("checkpoint_2026-01-01_00-00-02", [0])):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "ema_fp32.pt").write_bytes(b"rank 0 wrote this")
        for r in ranks:
            (folder / complete_file(r)).write_text(json.dumps({"world": 2, "step": 3}))
    assert latest_checkpoint(cfg).endswith("checkpoint_2026-01-01_00-00-01")
    (root / "checkpoint_2026-01-01_00-00-02" / complete_file(1)).write_text(json.dumps({"world": 2, "step": 6}))
    assert latest_checkpoint(cfg).endswith("checkpoint_2026-01-01_00-00-02")


def test_resuming_another_model_is_refused_on_the_driver(tmp_path):
    from vdvae_dist.launch.ray_train import train_distributed
    from vdvae_dist.artifacts.run_folder import CONFIG_FILE

    cfg = load("tiny", overrides=[f"train.output={tmp_path / 'run'}", "data.crops_per_image=4"])
    folder = tmp_path / "run" / "ray" / run_name(cfg) / "checkpoint_2026-01-01_00-00-01"
    folder.mkdir(parents=True)
    (folder / complete_file(0)).write_text(json.dumps({"world": 1, "step": 3}))
    other = to_dict(load("tiny", overrides=["model.width=16"]))
    (folder / CONFIG_FILE).write_text(json.dumps(other))
    # refused before Ray starts: every worker would fail the same way, max_failures times
    with pytest.raises(ValueError, match=r"different model config \(model.width"):
        train_distributed(cfg)


def test_the_driver_refuses_what_every_worker_would_and_makes_init_from_absolute(tmp_path, monkeypatch):
    from vdvae_dist.launch.ray_train import prepare

    monkeypatch.chdir(tmp_path)
    base = [f"train.output={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match="optim.gradient_skip=false is out of range with DeepSpeed workers"):
        prepare(load("tiny", overrides=base + ["optim.gradient_skip=false"]))
    with pytest.raises(ValueError, match="data.order='sequential' is out of range with scaling.workers=2"):
        prepare(load("tiny", overrides=base + ["data.order=sequential", "scaling.workers=2"]))
    with pytest.raises(ValueError, match="engine.deepspeed.zero_optimisation is out of range"):  # British spelling
        prepare(load("tiny", overrides=base + ["engine.deepspeed.zero_optimisation={overlap_comm=true}"]))
    cfg = prepare(load("tiny", overrides=base + ["train.init_from=imported"]))
    assert cfg.train.init_from == str(tmp_path / "imported")  # workers do not run in the driver's folder
    for uri in ("runs:/abc/model/ema_fp32.pt", "s3://bucket/imported", "models:/m/1"):
        assert prepare(load("tiny", overrides=base + [f"train.init_from={uri}"])).train.init_from == uri


def _ray_checkpoint(folder, world: int, cfg_dict: dict, skip: str | None = None, launch: bool = True):
    """A checkpoint as the workers leave it: each rank's files, then its marker listing them."""
    from vdvae_dist.artifacts.run_folder import CONFIG_FILE, ZERO_LAYOUT_FILE, data_file, marker_bytes

    folder.mkdir(parents=True)
    for rank in range(world):
        own = folder.parent / f".rank{rank}"
        own.mkdir()
        if rank == 0:
            (own / CONFIG_FILE).write_text(json.dumps(cfg_dict))
        if rank == 0 and launch:
            (own / ZERO_LAYOUT_FILE).write_text(json.dumps({"world": world, "zero_stage": 2, "bf16": False}))
        (own / data_file(rank)).write_text("{}")
        marker = marker_bytes(own, rank, world, 3)
        for f in own.iterdir():
            if f.name != skip:  # the one file whose upload never arrived
                f.rename(folder / f.name)
        (folder / complete_file(rank)).write_bytes(marker)
    return folder


@pytest.fixture
def other_run():
    """A live process of this host holding a lock, as another run's driver would."""
    import socket
    import subprocess
    import sys

    from vdvae_dist.artifacts.output_lock import _start_time

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lock = json.dumps({"host": socket.gethostname(), "pid": proc.pid, "started": _start_time(proc.pid), "since": "now"})
    yield proc, lock
    proc.kill()
    proc.wait()


def test_resuming_an_incomplete_or_foreign_checkpoint_is_refused_on_the_driver(tmp_path, other_run):
    """--resume PATH: refused before Ray starts (every worker would fail on it, and Ray retry
    them max_failures times) when a file a marker lists never arrived, or the model differs."""
    from vdvae_dist.artifacts.run_folder import LOCK_FILE
    from vdvae_dist.launch.ray_train import train_distributed

    cfg = load("tiny", overrides=[f"train.output={tmp_path / 'run'}"])
    # the output is locked by a live process: a check that let a checkpoint through would
    # end at the lock ("in use"), never in a Ray run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(other_run[1])
    broken = _ray_checkpoint(tmp_path / "a" / "checkpoint_1", 2, to_dict(cfg), skip="data-rank00001.json")
    with pytest.raises(ValueError, match=r"the checkpoint is incomplete: data-rank00001.json \(listed by rank 1's "
                                         r"marker\) is missing"):
        train_distributed(cfg, resume=str(broken))
    other = _ray_checkpoint(tmp_path / "b" / "checkpoint_1", 2, to_dict(load("tiny", overrides=["model.width=16"])))
    with pytest.raises(ValueError, match=r"different model config \(model.width\)"):
        train_distributed(cfg, resume=str(other))
    local = _ray_checkpoint(tmp_path / "c" / "step-00000003", 1, to_dict(cfg), launch=False)
    with pytest.raises(ValueError, match="has no layout.json: it was not written by `vdvae-dist launch`"):
        train_distributed(cfg, resume=str(local))
    (other / complete_file(0)).unlink()
    with pytest.raises(ValueError, match="incomplete: no completion marker complete-rank00000.json"):
        train_distributed(cfg, resume=str(other))
    assert not (tmp_path / "run" / "ray").exists()  # nothing started


def test_the_driver_refuses_an_output_another_run_holds(tmp_path, other_run, monkeypatch):
    from vdvae_dist.artifacts.run_folder import LOCK_FILE
    from vdvae_dist.launch.ray_train import train_distributed

    monkeypatch.setenv("RAY_ADDRESS", "local")  # never another session's cluster
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(other_run[1])
    # more CPUs per worker than this machine has: past the lock, the driver would stop at the
    # tracking check (workers on nodes an autoscaler adds), never train
    cfg = load("tiny", overrides=[f"train.output={out}", "scaling.cpus_per_worker=512"])
    with pytest.raises(ValueError, match=rf"is in use by another run \(pid {other_run[0].pid}"):
        train_distributed(cfg)
