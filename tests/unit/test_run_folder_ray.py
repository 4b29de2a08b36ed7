"""A rank's checkpoint under Ray Train: Ray's own copy of its files first, then its
completion marker in a step of its own (Ray copies files in no set order), on local storage
after the copied files were fsynced, on S3 (a real local S3 server) as the last object."""
import json
import os
import tempfile
from pathlib import Path

from vdvae_dist.artifacts.run_folder import complete_file, data_file, incomplete, marker_bytes
from vdvae_dist.artifacts.storage import join, to_fs


def _rank_files(folder: Path) -> bytes:
    (folder / "zero").mkdir()
    (folder / "zero" / "optim.pt").write_bytes(b"o" * 50)
    (folder / data_file(1)).write_text("{}")
    return marker_bytes(folder, 1, 2, 4)


def _upload(storage_path: str, storage_filesystem=None) -> str:
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from vdvae_dist.launch.worker import upload_then_mark

    storage = StorageContext(storage_path, "run", storage_filesystem)
    with tempfile.TemporaryDirectory() as tmp:
        marker = _rank_files(Path(tmp))
        persisted = upload_then_mark(storage, Checkpoint.from_directory(tmp), "checkpoint_1", complete_file(1), marker)
    return persisted.path


def test_on_local_storage_the_marker_follows_the_fsynced_files(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = _upload(str(tmp_path))
    assert path == str(tmp_path / "run" / "checkpoint_1")
    marker = json.loads(Path(path, complete_file(1)).read_text())
    assert marker["files"] == {"zero/optim.pt": 50, data_file(1): 2}
    at = synced.index(str(Path(path, complete_file(1))))
    assert {str(Path(path, "zero", "optim.pt")), str(Path(path, data_file(1))), str(Path(path, "zero"))} <= set(
        synced[:at])
    assert synced[at + 1:] == [path]  # the folder's entry for the marker


def test_on_s3_the_marker_is_uploaded_with_its_file_list(s3_bucket):
    from vdvae_dist.launch.ray_train import ray_storage

    url = f"s3://{s3_bucket}/out/ray"
    path = _upload(*ray_storage(url))
    fs, _ = to_fs(url)
    assert json.loads(fs.cat_file(join(path, complete_file(1))))["files"] == {"zero/optim.pt": 50, data_file(1): 2}
    # rank 0 never wrote here: incomplete, naming its marker; rank 1's own files are all there
    assert incomplete(fs, path) == f"no completion marker {complete_file(0)} (the checkpoint was never finished)"
    fs.pipe_file(join(path, complete_file(0)), marker_bytes(Path(tempfile.mkdtemp()), 0, 2, 4))
    assert incomplete(fs, path) is None
    fs.rm(join(path, "zero/optim.pt"))
    assert incomplete(fs, path) == "zero/optim.pt (listed by rank 1's marker) is missing"
