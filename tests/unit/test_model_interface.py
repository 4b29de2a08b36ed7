"""Both model kinds offer the interface training and serving rely on; the serving side
(Sampler, Ray-free) runs on each."""
import numpy as np
import pytest
import torch

from vdvae_dist.artifacts.weights import Weights
from vdvae_dist.config import load
from vdvae_dist.model import ImageModel, build_model
from vdvae_dist.serve.sampler import Sampler

KINDS = {"vdvae": ("tiny", []), "aevb": ("mnist-small", ["model.kind=aevb"])}


def _weights(kind):
    preset, overrides = KINDS[kind]
    cfg = load(preset, overrides=overrides)
    torch.manual_seed(0)
    return Weights(build_model(cfg.model).eval(), cfg, 0, "test")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_model_kind_implements_the_interface_and_serves(kind):
    w = _weights(kind)
    members = [m for m in ImageModel.__dict__ if not m.startswith("_")] + list(ImageModel.__annotations__)
    assert all(hasattr(w.model, m) for m in members), [m for m in members if not hasattr(w.model, m)]
    sampler = Sampler(w, torch.device("cpu"), max_images=8)
    temps = [0.8] * w.model.num_groups
    jobs = [{"n": 2, "temperature": temps, "seed": 1}, {"n": 1, "temperature": temps, "seed": 2}]
    first, second = sampler.sample_many(jobs)
    assert first.shape == (2, *w.model.data_shape) and first.dtype == np.uint8 and second.shape[0] == 1
    alone = w.model.sample(2, temps, seed=1).numpy()  # a request's images do not depend on the others
    assert np.array_equal(first, alone)
    image = first[0]
    recon, bpd = sampler.reconstruct(image, w.model.num_groups, temps, seed=3)
    assert recon.shape == image.shape and np.isfinite(bpd) and bpd > 0
    assert "latent_groups" in sampler.info()
