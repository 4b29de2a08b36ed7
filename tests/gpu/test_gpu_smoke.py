"""One-GPU tests for people running on GPUs (skipped where CUDA is absent, as on the
project's CI machines): what a GPU changes must hold there. bf16 is chosen where the GPU
computes it natively and reaches the blocks under autocast; the batches, the weights and
the EMA live on the GPU; seeded sampling repeats; the GPU computes what the CPU does; the
single-process trainer and one DeepSpeed worker under Ray Train run the one training loop."""
import math

import pytest
import torch

from vdvae_dist.config import load

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cfg(tmp_path, *extra):
    # random images in an .npz: a bare GPU machine (make gpu-wheels) has no scikit-image photos
    data = tmp_path / "images.npz"
    if not data.exists():
        import numpy as np

        np.savez(data, data=np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    return load("tiny", overrides=[f"data.source=npz:{data}", "optim.total_steps=4", "optim.batch_size=4", "train.checkpoint_every=2",
                                   "train.log_every=2", "data.crops_per_image=4", "train.grid_samples=2",
                                   f"train.output={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                   *extra])


def _native_bf16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _images(n: int, device) -> torch.Tensor:
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return x.to(device)


def test_the_torch_rule_trains_on_the_gpu_in_native_bf16_with_batches_and_ema_there(tmp_path):
    from vdvae_dist.model import build_model
    from vdvae_dist.model.blocks import TopDownBlock
    from vdvae_dist.train.objective import group_sizes
    from vdvae_dist.train.step import train_step
    from vdvae_dist.train.torch_rule import TorchRule

    if torch.cuda.get_device_capability() >= (8, 0):
        assert _native_bf16()  # Ampere and later compute bf16 natively
    cfg = _cfg(tmp_path, "engine.device=cuda", "engine.precision=auto")
    torch.manual_seed(0)
    rule = TorchRule(build_model(cfg.model), cfg, torch.device("cuda"))
    assert rule.bf16 == _native_bf16() and rule.device.type == "cuda"
    block = next(m for m in rule.module.modules() if isinstance(m, TopDownBlock))
    conv = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda mod, args, out: seen.append((out.dtype, out.device.type)))
    inputs = []
    rule.module.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].device.type))
    sizes = group_sizes(rule.module).to(rule.device)
    for _ in range(2):
        terms, outcome = train_step(rule, _images(4, "cpu"), cfg.loss, sizes, seed=0)  # placed by the step
        assert math.isfinite(terms.loss.item()) and not outcome.skipped
    assert set(inputs) == {"cuda"}
    assert set(seen) == {(torch.bfloat16 if rule.bf16 else torch.float32, "cuda")}
    assert terms.loss.dtype == torch.float32  # the loss stays fp32 under autocast
    assert {p.device.type for p in rule.ema.model.parameters()} == {"cuda"}
    assert {p.dtype for p in rule.ema.model.parameters()} == {torch.float32}
    weights = rule.ema_weights()
    model = build_model(cfg.model).cuda().eval()
    model.load_state_dict(weights)
    a, b = model.sample(3, seed=5), model.sample(3, seed=5)
    assert a.device.type == "cuda" and torch.equal(a, b) and not torch.equal(a, model.sample(3, seed=6))


def test_the_gpu_computes_what_the_cpu_does():
    """fp32 without TF32: the bound with posterior means (no latent noise, which the two
    devices draw differently) and its gradient norm, equal to ~1e-5 (float summation order)."""
    from vdvae_dist.model import build_model
    from vdvae_dist.model.latent import ZERO_NOISE

    cfg = load("tiny")
    torch.manual_seed(0)
    cpu = build_model(cfg.model)
    gpu = build_model(cfg.model).cuda()
    gpu.load_state_dict(cpu.state_dict())
    results = {}
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name, model in (("cpu", cpu), ("gpu", gpu)):
            device = next(model.parameters()).device
            loss = model(_images(4, device), noise=ZERO_NOISE).nelbo.mean()
            loss.backward()
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            results[name] = (loss.item(), norm.item())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    assert results["gpu"] == pytest.approx(results["cpu"], rel=1e-4)


def test_single_process_training_on_one_gpu(tmp_path):
    from vdvae_dist.train.local import train_local

    said = []
    summary = train_local(_cfg(tmp_path, "engine.device=cuda"), log=lambda *a: said.append(" ".join(map(str, a))))
    assert summary["step"] == 4 and math.isfinite(summary["test_bits_per_dim"])
    precision = [line for line in said if line.startswith("precision: ")]
    assert precision and precision[0].startswith("precision: bf16" if _native_bf16() else "precision: fp32")
    assert any("parameters on cuda" in line for line in said)


def test_one_deepspeed_worker_on_one_gpu(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="needs MLflow (not carried to a bare GPU machine)")
    ray = pytest.importorskip("ray", reason="needs Ray (its wheel is too large to carry to a bare GPU machine)")

    from vdvae_dist.launch.ray_train import train_distributed
    from vdvae_dist.tracking.logged_weights import load_weights

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        summary = train_distributed(_cfg(tmp_path, "scaling.workers=1", "scaling.gpus_per_worker=1"))
    finally:
        ray.shutdown()
    assert summary["step"] == 4 and math.isfinite(summary["test_bits_per_dim"])
    tags = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"]).data.tags
    assert tags["precision"].startswith("bf16" if _native_bf16() else "fp32"), tags["precision"]
    weights = load_weights(summary["weights"])  # DeepSpeed's fp32 EMA, gathered and published
    assert weights.step == 4 and {p.dtype for p in weights.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_blocks_on_one_gpu_train_like_eager(tmp_path, mode):
    # reduce-overhead replays CUDA graphs of the launch-bound low-resolution blocks
    from vdvae_dist.model import build_model
    from vdvae_dist.train.torch_rule import TorchRule

    losses = {}
    for compile_mode in ("off", mode):
        torch.manual_seed(0)
        cfg = _cfg(tmp_path, "engine.device=cuda", "engine.precision=fp32", f"engine.compile={compile_mode}")
        rule = TorchRule(build_model(cfg.model), cfg, torch.device("cuda"))
        x = torch.randint(0, 256, (4, *rule.module.data_shape), dtype=torch.uint8, device="cuda",
                          generator=torch.Generator("cuda").manual_seed(1)).contiguous(memory_format=torch.channels_last)
        for _ in range(3):  # graphs are recorded after warm-up calls
            torch.manual_seed(2)
            loss = rule.forward(x).nelbo.mean()
            loss.backward()
            rule.module.zero_grad(set_to_none=True)
        losses[compile_mode] = loss.item()
        assert rule.compiled is None or rule.compiled.failure is None, rule.compiled.failure
    assert losses[mode] == pytest.approx(losses["off"], rel=1e-4)


def test_the_mlflow_run_records_gpu_system_metrics(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="needs MLflow (not carried to a bare GPU machine)")

    from vdvae_dist.train.local import train_local

    # sample every second and log each sample: the run is a few seconds long
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    summary = train_local(_cfg(tmp_path, "engine.device=cuda"), log=lambda *_: None, track=True)
    metrics = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"]).data.metrics
    assert "system/gpu_0_memory_usage_megabytes" in metrics and "system/gpu_0_utilization_percentage" in metrics
