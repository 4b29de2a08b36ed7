"""Sample grids a person can read: a Bernoulli model's grids show pixel probabilities (as the
papers show binary samples), not a black-and-white draw, and small images are upscaled to
at least READABLE_SIDE pixels a side, in the run's grids and the evaluation figures alike."""
import numpy as np
import pytest
import torch

from vdvae_dist.artifacts.images import READABLE_SIDE, grid, upscaled
from vdvae_dist.config import load
from vdvae_dist.evaluation.figures import reconstructions_by_depth, samples_by_temperature
from vdvae_dist.model import build_model
from vdvae_dist.train.publish import grid_samples


@pytest.fixture(scope="module", params=["vdvae", "aevb"])
def bernoulli_model(request):
    cfg = load("mnist-small", overrides=[f"model.kind={request.param}", "train.grid_samples=4"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model).eval()


def _grey_levels(image) -> set:
    return set(np.unique(np.asarray(image)).tolist())


def test_bernoulli_grids_hold_probabilities_not_binary_draws(bernoulli_model):
    cfg, model = bernoulli_model
    drawn = model.sample(4, seed=1)
    assert _grey_levels(drawn) <= {0, 255}  # what a draw of binary pixels gives
    shown = grid_samples(cfg, model)
    assert shown.shape == (4, 1, 28, 28) and len(_grey_levels(shown) - {0, 255}) > 10
    figure = samples_by_temperature(model, [1.0, 0.5], 3, seed=2)
    assert len(_grey_levels(figure) - {0, 255}) > 10
    images = (torch.rand(2, 1, 28, 28) > 0.5).to(torch.uint8) * 255
    rows = reconstructions_by_depth(model, images, [0, 1], seed=2)
    assert len(_grey_levels(rows) - {0, 255}) > 10


def test_grids_upscale_small_images_to_a_readable_side(bernoulli_model):
    cfg, model = bernoulli_model
    pad = 2
    figure = samples_by_temperature(model, [1.0, 0.5], 3, seed=2)  # 2 rows x 3 images of 28 px
    side = (figure.shape[0] - pad) // 2 - pad
    assert side >= READABLE_SIDE and side % 28 == 0 and figure.shape[1] == 3 * (side + pad) + pad
    rows = reconstructions_by_depth(model, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), [0, 1], seed=2)
    assert (rows.shape[0] - pad) // 2 - pad >= READABLE_SIDE


def test_upscaling_repeats_each_pixel_by_a_whole_factor():
    x = np.arange(2 * 3 * 28 * 28, dtype=np.uint8).reshape(2, 3, 28, 28)
    big = upscaled(x, 96)
    assert big.shape == (2, 3, 112, 112)  # 4 x 28: the smallest whole factor reaching 96
    assert np.array_equal(big[:, :, ::4, ::4], x) and np.array_equal(big[:, :, 3::4, 3::4], x)
    assert np.array_equal(upscaled(x, 28), x)
    assert grid(x, cols=2, min_side=96).shape == (2 + 112 + 2, 2 * (112 + 2) + 2, 3)
    assert grid(np.zeros((1, 3, 256, 256), np.uint8), min_side=96).shape == (260, 260, 3)  # large ones stay
