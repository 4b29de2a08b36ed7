"""A checkpoint folder on local disk: each rank's completion marker lists its files and is
written last, after every file and folder reached the disk; a folder missing a listed file
is incomplete, and `latest` falls back past it, saying so."""
import json
import os

import pytest

from vdvae_dist.artifacts import run_folder
from vdvae_dist.artifacts.run_folder import LocalCheckpoints, complete_file, data_file, incomplete, latest


def _write(folder):
    """What a plain-torch rank writes (rule state, export, config, data position), plus a
    subfolder as DeepSpeed's zero/ is."""
    (folder / "state.pt").write_bytes(b"x" * 100)
    (folder / "zero").mkdir()
    (folder / "zero" / "shard.pt").write_bytes(b"y" * 7)
    run_folder.write_rank_files(folder, 0, 1, 3, {"model": {}}, {"kind": "memory", "epoch": 0, "index": 3})


def test_the_marker_lists_every_file_and_follows_their_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):  # the real fsync, and which file or folder it was for
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    final = LocalCheckpoints(tmp_path, keep=2).save(3, _write, {})
    marker = json.loads((tmp_path / "step-00000003" / complete_file(0)).read_text())
    assert marker["world"] == 1 and marker["step"] == 3
    assert marker["files"] == {"state.pt": 100, "zero/shard.pt": 7, "config.json": len(json.dumps({"model": {}},
                                                                                                 indent=1)),
                               data_file(0): (tmp_path / "step-00000003" / data_file(0)).stat().st_size}
    names = [p.rsplit("/", 1)[-1] for p in synced]
    at = names.index(complete_file(0))
    # every file and folder of the checkpoint before its marker; the folders (the renamed
    # checkpoint's parent included) after it
    assert {"state.pt", "shard.pt", "config.json", data_file(0), "zero"} <= set(names[:at])
    assert any(p.startswith(str(tmp_path / ".step-00000003.tmp-")) for p in synced[at + 1:])
    assert str(tmp_path) in synced[at + 1:] and incomplete(_local(), final) is None


def _local():
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def test_a_folder_missing_a_listed_file_is_incomplete_and_latest_falls_back(tmp_path):
    store = LocalCheckpoints(tmp_path, keep=3)
    store.save(3, _write, {})
    newest = store.save(6, _write, {})
    (tmp_path / "step-00000006" / data_file(0)).unlink()  # a file lost (a disk, a hand, a sync tool)
    assert incomplete(_local(), newest) == f"{data_file(0)} (listed by rank 0's marker) is missing"
    said = []
    assert latest(tmp_path, said.append).name == "step-00000003"
    assert said == [f"warning: checkpoint {tmp_path / 'step-00000006'} is incomplete ({data_file(0)} (listed by "
                    "rank 0's marker) is missing); resuming from the older complete checkpoint step-00000003"]
    (tmp_path / "step-00000003" / "zero" / "shard.pt").write_bytes(b"short")  # another size than listed
    assert incomplete(_local(), str(tmp_path / "step-00000003")) == "zero/shard.pt has 5 bytes; rank 0's marker lists 7"
    with pytest.raises(ValueError, match="names step-00000006, which is incomplete .* and no other complete checkpoint"):
        latest(tmp_path, said.append)


def test_latest_naming_a_deleted_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    store = LocalCheckpoints(tmp_path, keep=3)
    store.save(3, _write, {})
    store.save(6, _write, {})
    import shutil

    shutil.rmtree(tmp_path / "step-00000006")
    said = []
    assert latest(tmp_path, said.append).name == "step-00000003"
    assert "step-00000006 is missing" in said[0]
