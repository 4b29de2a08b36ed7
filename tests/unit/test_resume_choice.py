"""`--resume latest` picks the newest checkpoint every rank finished writing, falling back
past one whose other ranks' files never arrived (real folders as Ray Train lays them out)."""
import json

from vdvae_dist.config import load
from vdvae_dist.launch.ray_train import latest_checkpoint, run_name, storage_path
from vdvae_dist.train.loop import complete_file


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
