"""The end of a run: the EMA weights are published before the final held-out pass, so a
pass that fails (here: a held-out image that does not decode) keeps them."""
import json

import pytest

from tests.shard_edits import as_built, members, write_members
from vdvae_dist.config import load
from vdvae_dist.data.shardwriter import build


def _break_one_image(shards, split: str) -> None:
    """Replace the first image of the split's first shard by bytes that are no image, and
    update the manifest's size and SHA-256 to match: the shard reads fine, the image does not."""
    manifest = json.loads((shards / "manifest.json").read_text())
    info = next(s for s in manifest["shards"] if s["split"] == split)
    path = shards / info["name"]
    shard = members(path)
    first = next(i for i, (m, _) in enumerate(shard) if m.name.endswith((".png", ".jpg")))
    shard[first] = (shard[first][0], b"this is not an image")
    write_members(path, shard)
    as_built(shards, path)


def test_a_failing_final_evaluation_keeps_the_published_weights(tmp_path):
    from vdvae_dist.artifacts.weights import load_weights
    from vdvae_dist.train.local import train_local
    from vdvae_dist.train.publish import EvaluationFailed

    shards = tmp_path / "shards"
    build("skimage:12", str(shards), 32, val=8, shard_bytes=30_000, progress=False)
    _break_one_image(shards, "val")
    out = tmp_path / "run"
    cfg = load("tiny", overrides=["optim.total_steps=1", "train.checkpoint_every=0", "train.log_every=1",
                                  "optim.batch_size=4", "train.grid_samples=4", "engine.precision=fp32",
                                  f"train.output={out}", f"data.shards={shards}", "data.source=",
                                  "data.loader_workers=0", "data.shuffle_buffer=4"])
    said = []
    with pytest.raises(EvaluationFailed, match=r"held-out evaluation failed \(rank 0: .*val-00000"):
        train_local(cfg, log=said.append)
    weights = load_weights(str(out))  # what serve and evaluate read: there, without scores
    assert weights.step == 1 and weights.metrics == {}
    assert (out / "samples.png").is_file() and not (out / "summary.json").exists()
    assert any("published without scores" in line for line in said)


def _pass_on_rank(rank: int, port: int, results) -> None:
    """One of two gloo processes: rank 1's held-out images fail to decode, rank 0's are fine."""
    import datetime
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from vdvae_dist.model import build_model
    from vdvae_dist.train.publish import EvaluationFailed, held_out_pass

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    cfg = load("tiny")

    def eval_pass(batch_size):
        if rank == 1:
            raise ValueError("val-00000.tar: sample val-00000003: cannot identify image file")
        yield torch.zeros(2, 3, 32, 32, dtype=torch.uint8)

    try:
        held_out_pass(cfg, SimpleNamespace(bf16=False, device=torch.device("cpu")),
                      SimpleNamespace(eval_pass=eval_pass), build_model(cfg.model), rank, 2)
        results.put((rank, "passed"))
    except EvaluationFailed as e:
        results.put((rank, str(e)))
    except Exception as e:  # e.g. the reduction broken by the other rank's exit
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_a_held_out_pass_failing_on_one_rank_fails_on_every_rank():
    """No rank is left waiting in the reduction for a rank that raised: all raise together."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_pass_on_rank, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got[0] == got[1] == ("the held-out evaluation failed (rank 1: ValueError: val-00000.tar: sample "
                                "val-00000003: cannot identify image file)")
