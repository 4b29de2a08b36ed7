import math
import subprocess
import sys

import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.model import VDVAE, build_model, count_parameters
from vdvae_dist.model.latent import gaussian_kl


def _images(n=4, c=3, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8)


def test_importing_the_model_loads_neither_ray_nor_deepspeed():
    code = ("import sys, vdvae_dist.model, vdvae_dist.train.local; "
            "bad = [m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules]; "
            "sys.exit(f'loaded: {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    qm, pm = torch.randn(100, generator=g), torch.randn(100, generator=g)
    qs, ps = torch.rand(100, generator=g) + 0.1, torch.rand(100, generator=g) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(qm, qs), torch.distributions.Normal(pm, ps))
    assert torch.allclose(gaussian_kl(qm, qs, pm, ps), ref, atol=1e-5)


@pytest.mark.parametrize("design", ["efficient", "original"])
def test_elbo_is_finite_and_consistent(design, seeded):
    model = build_model(load("tiny", overrides=[f"model.design={design}"]).model)
    elbo = model(_images(), stats=True)
    assert torch.isfinite(elbo.nelbo).all()
    assert elbo.kl.shape == (model.num_groups, 4)
    assert torch.allclose(elbo.nelbo, elbo.recon + elbo.kl.sum(0))
    assert elbo.dims == 3 * 32 * 32
    assert (elbo.kl >= -1e-3).all()
    per_channel = torch.stack([c.sum(1) for c in elbo.kl_channels])
    assert torch.allclose(per_channel, elbo.kl, rtol=1e-4, atol=1e-3)
    assert torch.allclose(elbo.bits_per_dim(), elbo.nelbo / (3072 * 0.6931471805599453))


def test_gradients_reach_every_parameter(seeded):
    model = build_model(load("tiny").model)
    model(_images()).nelbo.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert missing == []


def test_original_design_differs_structurally():
    eff = build_model(load("tiny").model)
    orig = build_model(load("tiny", overrides=["model.design=original"]).model)
    names = {n for n, _ in orig.named_parameters()}
    assert not any("skip_proj" in n or ".conv." in n for n in names)  # no projected skips, learned pools/unpools
    assert "output_affine.gain" in names and any("skip_proj" in n for n, _ in eff.named_parameters())
    block = next(u for u in orig.decoder if hasattr(u, "prior"))
    assert isinstance(block.prior.net[0], torch.nn.GELU) and orig.input_conv.kernel_size == (3, 3)
    last = block.prior.net[-1]
    assert last.weight.abs().sum() == 0 and last.bias.abs().sum() == 0  # zero-initialised prior output
    assert count_parameters(orig) < count_parameters(eff)


def test_sample_is_seeded_and_takes_per_group_temperatures():
    model = build_model(load("tiny").model).eval()
    a, b = model.sample(3, 0.9, seed=7), model.sample(3, 0.9, seed=7)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, model.sample(3, 0.9, seed=8))
    temps = [0.5] * model.num_groups
    assert model.sample(2, temps, seed=1).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=f"exactly {model.num_groups}"):
        model.sample(2, [1.0, 1.0], seed=1)
    with pytest.raises(ValueError, match="n=0"):
        model.sample(0)


def test_reconstruct_uses_the_posterior_only_for_the_first_depth_groups():
    model = build_model(load("tiny").model).eval()
    x1, x2 = _images(2, seed=1), _images(2, seed=2)
    # depth 0 ignores the input entirely; full depth depends on it
    assert torch.equal(model.reconstruct(x1, 0, seed=3), model.reconstruct(x2, 0, seed=3))
    g = model.num_groups
    assert not torch.equal(model.reconstruct(x1, g, seed=3), model.reconstruct(x2, g, seed=3))
    with pytest.raises(ValueError, match=f"depth={g + 1}"):
        model.reconstruct(x1, g + 1)


def test_mnist_padding_and_bernoulli_targets():
    model = build_model(load("mnist-small").model)
    x = (_images(2, c=1, side=28) >= 128).to(torch.uint8) * 255
    elbo = model(x)
    assert elbo.dims == 28 * 28 and torch.isfinite(elbo.nelbo).all()
    s = model.sample(2, seed=0)
    assert s.shape == (2, 1, 28, 28) and set(s.unique().tolist()) <= {0, 255}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    cfg = load("tiny")
    torch.manual_seed(0)
    plain = build_model(cfg.model)
    ckpt = build_model(load("tiny", overrides=[f"model.checkpoint_activations={mode}"]).model)
    ckpt.load_state_dict(plain.state_dict())
    x = _images()
    torch.manual_seed(1)
    l1 = plain(x).nelbo.mean(); l1.backward()
    torch.manual_seed(1)
    l2 = ckpt(x).nelbo.mean(); l2.backward()
    assert torch.allclose(l1, l2)
    for (n, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5, rtol=1e-4), n


def _bytes_kept_for_backward(mode: str) -> int:
    """Bytes the CPU allocator still holds after the forward pass (what autograd keeps for
    backward, plus the small outputs), counted by torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = build_model(load("tiny", overrides=[f"model.checkpoint_activations={mode}"]).model)
    x = _images(4)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(x).nelbo.mean()
    kept = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    loss.backward()
    return kept


def test_checkpointing_modes_keep_less_for_backward_in_order():
    none, selective, full = (_bytes_kept_for_backward(m) for m in ("none", "selective", "full"))
    # selective keeps the convolution outputs only (~half of a cell's tensors); full only block inputs
    assert full < 0.5 * none and selective < 0.8 * none and full < selective, (none, selective, full)


@pytest.mark.parametrize("preset, over", [("mnist-small", []), ("tiny", ["model.likelihood=gaussian"])])
def test_aevb_has_the_same_interface(preset, over):
    cfg = load(preset, overrides=["model.kind=aevb", *over])
    model = build_model(cfg.model)
    c, side = cfg.model.channels, cfg.data.resolution
    x = _images(3, c=c, side=side)
    elbo = model(x)
    assert elbo.kl.shape == (1, 3) and torch.isfinite(elbo.nelbo).all()
    elbo.nelbo.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.sample(2, seed=0).shape == (2, c, side, side)
    assert torch.equal(model.sample(2, seed=4), model.sample(2, seed=4))
    assert model.reconstruct(x, 1, seed=0).shape == x.shape
    if over == []:
        assert model.encoder[0].out_features == 500


def test_dmol_5bit_targets_use_the_5bit_grid():
    model = build_model(load("tiny", overrides=["model.num_bits=5"]).model)
    # the official codes' grid: floor to a multiple of 8, then (v - 127.5) / 127.5
    t = model.codec.targets(torch.tensor([0, 7, 8, 255], dtype=torch.uint8))
    assert torch.allclose(t, (torch.tensor([0.0, 0.0, 8.0, 248.0]) - 127.5) / 127.5)
    assert torch.equal(model.codec.to_uint8(t), torch.tensor([0, 0, 8, 248], dtype=torch.uint8))


def test_model_is_device_agnostic_on_meta():
    with torch.device("meta"):
        model = VDVAE(load("tiny").model)
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize("preset", ["tiny", "mnist-small"])
def test_batched_requests_get_the_images_they_get_alone(preset):
    torch.manual_seed(0)
    model = build_model(load(preset).model).eval()
    groups = model.num_groups
    requests = [(2, 1.0, 9), (3, 0.8, 5), (1, [0.5] * groups, 7)]
    batched = model.sample_batch(requests)
    assert [len(x) for x in batched] == [2, 3, 1]
    for (n, t, seed), images in zip(requests, batched):
        assert torch.equal(images, model.sample(n, t, seed=seed))  # as if it had run alone
    with pytest.raises(ValueError, match="n=0 is out of range"):
        model.sample_batch([(0, 1.0, 1)])


def test_under_bf16_autocast_both_residual_streams_stay_bf16():
    # an fp32 learned tensor (start state, unpool bias) would promote every add after it
    # to fp32 and make each convolution cast its input back: slow and twice the memory
    from vdvae_dist.model.blocks import EncoderCell, TopDownBlock

    model = build_model(load("tiny").model)
    seen = []
    for m in model.modules():
        if isinstance(m, (EncoderCell, TopDownBlock)):
            m.register_forward_hook(lambda _m, _args, out: seen.append((type(_m).__name__, out[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(_images()).nelbo.mean().backward()
    kinds = {name for name, _ in seen}
    assert kinds == {"EncoderCell", "TopDownBlock"} and {dtype for _, dtype in seen} == {torch.bfloat16}, seen


def test_a_model_on_the_meta_device_runs_forward_and_backward():
    # benchmarks and the memory plan count FLOPs and memory on the meta device
    with torch.device("meta"):
        model = build_model(load("tiny").model)
        model(torch.zeros(2, *model.data_shape, dtype=torch.uint8)).nelbo.mean().backward()


def test_bits_per_dim_of_a_uniform_8bit_pixel_is_8():
    """The unit every bound is reported in: a pixel uniform over 256 values costs
    ln(256) nats, which is 8 bits."""
    from vdvae_dist.model import bits_per_dim

    dims = 3 * 32 * 32
    assert bits_per_dim(dims * math.log(256), dims) == pytest.approx(8.0, rel=1e-12)
