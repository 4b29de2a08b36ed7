"""Our training step against both official ones (tests/reference-train, copied from
../shared/reference-train: twelve official steps from a known checkpoint on fixed batches,
with every schedule shrunk so that the steps cross each boundary).

Every case goes through the path a user takes to fine-tune a released checkpoint:
`vdvae-dist import` (the forward case's checkpoint with the trajectory's official
hyperparameters) writes our export and config.toml; `vdvae-dist train --config
config.toml --set train.init_from=...` replays the batches in order with zero latent
noise; metrics.jsonl and the last checkpoint are compared step by step. Tolerances are
about ten times the official float32-vs-float64 spread (the fixture README), tight
enough that each schedule or objective difference listed in issue 21 fails them."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vdvae_dist.cli import main
from vdvae_dist.config import load
from vdvae_dist.official.importer import import_checkpoint
from vdvae_dist.train.schedules import balance_weights, kl_beta, lr_at

TESTS = Path(__file__).resolve().parents[1]
REF, TRAIN = TESTS / "reference", TESTS / "reference-train"
CASES = ["evd-cifar10", "evd-mnist", "vdvae-cifar10"]


def _source(case: str) -> str:
    return "efficient-vdvae" if case.startswith("evd") else "vdvae"


@pytest.fixture
def zero_latent_noise(monkeypatch):
    """Every Gaussian draw is zero (z = the posterior mean), as in the official runs."""
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: torch.zeros_like(real_randn(*a, **k)))
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: torch.zeros_like(x, **k))
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **k: self.zero_())


def _import(case: str, checkpoint: Path, out: Path):
    return import_checkpoint(_source(case), str(checkpoint), str(out), hparams=str(TRAIN / case / "hparams.json"))


def _official_weights(case: str, which: str, tmp: Path) -> dict[str, torch.Tensor]:
    """final.pt's raw or EMA set under our names, through the importer's mapping."""
    final = torch.load(TRAIN / case / "final.pt", weights_only=True)[which]
    path = tmp / f"official-{which}.pt"
    torch.save({"ema_model_state_dict": final} if case.startswith("evd") else final, path)
    r = _import(case, path, tmp / f"as-ours-{which}")
    return torch.load(r.out, weights_only=True)["ema"]


def _batches(case: str, tmp: Path) -> Path:
    data = np.load(TRAIN / case / "batches.npz")["data"]
    if data.max() <= 1:  # binarized digits stored as 0/1: our uint8 images hold 0/255
        data = data * np.uint8(255)
    path = tmp / "batches.npz"
    np.savez(path, data=data)
    return path


@pytest.mark.parametrize("case", CASES)
def test_training_replays_the_official_steps(case, tmp_path, zero_latent_noise):
    imported = _import(case, REF / case / "checkpoint.pt", tmp_path / "imported")
    out = tmp_path / "run"
    code = main(["train", "--config", imported.config, "--set", f"train.init_from={tmp_path / 'imported'}",
                 "--set", f"data.source=npz:{_batches(case, tmp_path)}", "--set", "data.order=sequential",
                 "--set", "data.val_fraction=0", "--set", "data.random_flip=false", "--set", "data.binarize=false",
                 "--set", "optim.total_steps=12", "--set", "train.log_every=1", "--set", "engine.precision=fp32",
                 "--set", "engine.device=cpu", "--set", f"train.output={out}",
                 "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 0
    official = json.loads((TRAIN / case / "trajectory.json").read_text())["steps"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for row, want in zip(rows, official):
        at = f"{case} step {want['global_step']}"
        assert row["lr"] == pytest.approx(want["lr"], rel=1e-6, abs=1e-12), at
        assert row["beta"] == pytest.approx(want["beta"], rel=1e-6), at
        assert (row["skipped_now"], row["clipped"]) == (int(want["skipped"]), int(want["clipped"])), at
        assert row["loss"] == pytest.approx(want["loss_total"], rel=1e-5), at
        assert row["recon"] == pytest.approx(want["loss_recon"], rel=1e-5), at
        assert row["kl"] == pytest.approx(want["kl_sum"], rel=1e-5), at
        assert row["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-5), at
        assert row["grad_norm_after_clip"] == pytest.approx(want["grad_norm_after_clip"], rel=2e-5), at
        groups = [row[f"kl_group_{g:03d}"] for g in range(len(want["kl_per_group"]))]
        np.testing.assert_allclose(groups, want["kl_per_group"], rtol=0, atol=1e-5 * max(want["kl_per_group"]))
    from vdvae_dist.artifacts.weights import load_weights

    published = load_weights(str(out))  # what evaluate and serve read: the fine-tuned EMA weights
    assert published.step == 12 and published.model.sample(2, seed=0).shape[0] == 2
    state = torch.load(out / "checkpoints" / "step-00000012" / "state.pt", weights_only=True)
    applied = sum(not s["skipped"] for s in official)
    assert state["optimizer"]["state"][0]["step"] == applied == official[-1]["optimizer_step_after"]
    for which, ours in (("model_state_dict", state["model"]), ("ema_model_state_dict", state["ema"])):
        for name, want in _official_weights(case, which, tmp_path).items():
            scale = float(want.abs().max()) or 1.0
            err = float((ours[name].float() - want).abs().max())
            assert err <= 5e-5 * scale, f"{case} {which} {name}: max |diff| {err:.3g} > 5e-5 * {scale:.3g}"


SCHEDULES = json.loads((TRAIN / "schedules.json").read_text())


def _evd_config(hp: dict):
    from vdvae_dist.official.hparams import evd_training_config

    t = evd_training_config(hp)
    return load("cifar10", overrides=[f"optim.{k}={json.dumps(v)}" for k, v in t["optim"].items()]
                + [f"loss.{k}={json.dumps(v)}" for k, v in t["loss"].items()])


@pytest.mark.parametrize("name", sorted(SCHEDULES["evd"]))
def test_every_official_efficient_vdvae_schedule(name):
    """Learning rate and beta at every listed step (float32 values: 1e-6 relative) and the
    balancing weights, for every official egs/*.cfg at its real values."""
    s = SCHEDULES["evd"][name]
    cfg = _evd_config(s["hparams"])
    for table in ("lr", "lr_extra_steps"):
        for step, want in s.get(table, {}).items():
            assert lr_at(int(step), cfg.optim) == pytest.approx(want, rel=1e-6, abs=1e-12), f"{name} lr at {step}"
    for table in ("beta", "beta_extra_steps"):
        for step, want in s.get(table, {}).items():
            assert kl_beta(int(step), cfg.loss) == pytest.approx(want, rel=1e-6), f"{name} beta at {step}"
    sizes = torch.tensor([float(c * h * w) for c, h, w in s["latent_group_shapes"]], dtype=torch.float64)
    for kind, case in s["gamma"].items():
        kl = torch.tensor(case["kl_losses"], dtype=torch.float64)
        for step, want in case["steps"].items():
            got = balance_weights(kl, sizes, int(step), cfg.loss)
            if want["weights"] is None:
                assert got is None, f"{name} {kind} gamma at {step}"
            else:
                np.testing.assert_allclose(got.numpy(), want["weights"], rtol=5e-5, err_msg=f"{name} {kind} {step}")


@pytest.mark.parametrize("name", sorted(SCHEDULES["openai"]))
def test_every_official_vdvae_schedule(name):
    from vdvae_dist.official.hparams import vdvae_training_config

    s = SCHEDULES["openai"][name]
    t = vdvae_training_config(s["H"])
    cfg = load(f"vdvae-{name}", overrides=[f"optim.{k}={json.dumps(v)}" for k, v in t["optim"].items()])
    for table in ("lr", "lr_extra_steps"):
        for step, want in s.get(table, {}).items():
            assert lr_at(int(step), cfg.optim) == pytest.approx(want, rel=1e-12), f"{name} lr at {step}"
    assert kl_beta(0, cfg.loss) == 1.0 and balance_weights(torch.ones(3), torch.ones(3), 0, cfg.loss) is None


def test_paper_presets_train_as_their_papers():
    """Efficient-VDVAE presets: its schedules; vdvae-* presets: openai's (no KL weight, no balancing)."""
    for name in ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq256-5bit", "ffhq1024", "celeba64", "mnist"):
        cfg = load(name)
        assert (cfg.optim.lr_schedule, cfg.loss.kl_schedule, cfg.loss.kl_balance) == (
            "efficient-vdvae", "efficient-vdvae-linear", "efficient-vdvae-gamma"), name
        assert cfg.optim.name == "adamax" and cfg.optim.weight_decay == 0.0, name
    for name in ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024"):
        cfg = load(f"vdvae-{name}")
        assert (cfg.optim.lr_schedule, cfg.loss.kl_schedule, cfg.loss.kl_balance) == ("vdvae", "none", "off"), name
        assert cfg.optim.name == "adamw" and cfg.optim.betas == (0.9, 0.9) and cfg.optim.ema_decay_float32, name


@pytest.mark.parametrize("case", ["evd-cifar10", "evd-imagenet32", "evd-ffhq256-8bit", "evd-mnist", "vdvae-cifar10",
                                  "vdvae-imagenet32"])
def test_every_import_writes_a_config_train_accepts(case, tmp_path, capsys):
    """config.toml beside every imported reference checkpoint: the whole run config, its model
    the imported weights' own, its training the official one translated."""
    r = import_checkpoint(_source(case), str(REF / case / "checkpoint.pt"), str(tmp_path / "imported"),
                          hparams=str(REF / case / "hparams.json"))
    assert r.config == str(tmp_path / "imported" / "config.toml")
    assert main(["config", "--config", r.config]) == 0
    cfg, saved = load(None, r.config), torch.load(r.out, weights_only=True)["config"]
    assert json.loads(capsys.readouterr().out) == saved  # the config `train --config` resolves is the export's
    want = ("efficient-vdvae", "efficient-vdvae-linear") if case.startswith("evd") else ("vdvae", "none")
    assert (cfg.optim.lr_schedule, cfg.loss.kl_schedule) == want
