"""Our networks against both official implementations (tests/reference, copied from
../shared/reference: small networks built, perturbed and run by the official codes).

Every case goes through the path users run: `import_checkpoint` (= `vdvae-dist import`)
writes our export, `load_weights` (what serve and evaluate use) rebuilds the model from
the imported config alone, and the zero-latent-noise outputs must match the official ones.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.config.validate import model_layout
from vdvae_dist.model import build_model
from vdvae_dist.model.latent import ZERO_NOISE
from vdvae_dist.official.hparams import evd_key_prefixes
from vdvae_dist.official.importer import import_checkpoint
from vdvae_dist.artifacts.weights import load_weights

REF = Path(__file__).resolve().parents[1] / "reference"
CASES = ["evd-cifar10", "evd-imagenet32", "evd-ffhq256-8bit", "evd-mnist", "vdvae-cifar10", "vdvae-imagenet32"]


def _images(case: str) -> torch.Tensor:
    x = torch.from_numpy(np.load(REF / case / "inputs.npy"))
    if case == "evd-mnist":  # 0/1 digits -> the uint8 images our codec binarises at 128
        x = (x.reshape(x.shape[0], 28, 28, 1) * 255).to(torch.uint8)
    return x.permute(0, 3, 1, 2).contiguous()


def _import(case: str, tmp_path, checkpoint: str = "checkpoint.pt"):
    source = "efficient-vdvae" if case.startswith("evd") else "vdvae"
    r = import_checkpoint(source, str(REF / case / checkpoint), str(tmp_path / case),
                          hparams=str(REF / case / "hparams.json"))
    return r, load_weights(r.out).model


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("case", CASES)
def test_imported_network_computes_the_official_numbers(case, tmp_path):
    r, model = _import(case, tmp_path)
    assert r.weights == "ema"
    exp = np.load(REF / case / "expected.npz")
    x = _images(case)
    with torch.no_grad():
        elbo = model(x, noise=ZERO_NOISE)
        post = model.output_params(x).numpy()
        prior = model.output_params(n=1).numpy()
    assert model.num_groups == exp["kl_per_group_nats"].shape[1]
    assert _rel(elbo.recon.double().numpy(), exp["recon_nats"]) < 1e-4
    assert _rel(elbo.kl.T.double().numpy(), exp["kl_per_group_nats"]) < 1e-4
    assert _rel(elbo.kl.sum(0).double().numpy(), exp["kl_total_nats"]) < 1e-4
    if "post_out" in exp.files:
        np.testing.assert_allclose(post, exp["post_out"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(prior, exp["prior_out"], atol=1e-4, rtol=0)
    else:  # 256 px: the fixture stores a subsample, the corners and per-channel sums
        for name, out in (("post_out", post), ("prior_out", prior)):
            np.testing.assert_allclose(out[:, :, ::16, ::16], exp[f"{name}_stride16"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(out[:, :, :16, :16], exp[f"{name}_tl16"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(out[:, :, -16:, -16:], exp[f"{name}_br16"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(out.astype(np.float64).sum(axis=(2, 3)), exp[f"{name}_sum_hw"], rtol=1e-4, atol=1e-2)


def test_openai_training_weights_import_with_their_module_prefix(tmp_path):
    r, model = _import("vdvae-cifar10", tmp_path, checkpoint="checkpoint-model.th")
    assert r.weights == "model"
    exp = np.load(REF / "vdvae-cifar10" / "expected.npz")
    with torch.no_grad():
        elbo = model(_images("vdvae-cifar10"), noise=ZERO_NOISE)
    assert _rel(elbo.recon.double().numpy(), exp["nonema_recon_nats"]) < 1e-4
    assert _rel(elbo.kl.sum(0).double().numpy(), exp["nonema_kl_total_nats"]) < 1e-4


def test_import_command_writes_an_export_and_names_a_misfit(tmp_path):
    case = REF / "evd-mnist"
    cmd = [sys.executable, "-m", "vdvae_dist.cli", "import", "--from", "efficient-vdvae",
           "--checkpoint", str(case / "checkpoint.pt"), "--hparams", str(case / "hparams.json"), "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "imported ema weights (261,201 parameters" in done.stdout
    assert load_weights(str(tmp_path)).cfg.model.likelihood == "bernoulli"
    # the same checkpoint against the full-width MNIST preset: refused, naming key and shapes
    cmd[cmd.index("--hparams"):cmd.index("--hparams") + 2] = []
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "matches no paper preset" in done.stderr and "mnist:" in done.stderr and "has shape" in done.stderr


def test_import_refuses_an_unknown_hparam_set_and_a_foreign_file(tmp_path):
    with pytest.raises(ValueError, match="--hps='cifar100'"):
        import_checkpoint("vdvae", str(REF / "vdvae-cifar10" / "checkpoint.pt"), str(tmp_path), hps="cifar100")
    with pytest.raises(ValueError, match="no ema_model_state_dict"):
        import_checkpoint("efficient-vdvae", str(REF / "vdvae-cifar10" / "checkpoint.pt"), str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        import_checkpoint("vdvae", str(tmp_path / "missing.th"), str(tmp_path), hps="cifar10")


def test_a_full_size_checkpoint_is_matched_to_its_paper_preset(tmp_path):
    """Without --hparams, the preset is found from the shapes: an Efficient-VDVAE checkpoint
    of the binarized-MNIST network (our weights under the official names) -> preset mnist."""
    torch.manual_seed(0)
    cfg = load("mnist")
    ours = build_model(cfg.model).state_dict()
    official_of = {mine: theirs for theirs, mine in evd_key_prefixes(model_layout(cfg.model)).items()}
    state = {}
    for key, value in ours.items():
        prefix = max((p for p in official_of if key.startswith(p)), key=len)
        state[official_of[prefix] + key[len(prefix):]] = value
    torch.save({"global_step": 7, "model_state_dict": {}, "ema_model_state_dict": state}, tmp_path / "ckpt.pt")
    r = import_checkpoint("efficient-vdvae", str(tmp_path / "ckpt.pt"), str(tmp_path / "out"))
    assert (r.preset, r.weights, r.parameters) == ("mnist", "ema", 69_919_585)
    loaded = load_weights(r.out).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())
