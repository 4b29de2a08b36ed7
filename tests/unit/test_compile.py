"""engine.compile: compiled blocks compute what eager ones do; a failing compiler falls
back to eager and says why (a real failure: inductor pointed at a missing C++ compiler)."""
from __future__ import annotations

import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.model import build_model
from vdvae_dist.train.objective import group_sizes
from vdvae_dist.train.step import train_step
from vdvae_dist.train.torch_rule import TorchRule

# two resolutions, one cell and one block each: few graphs to compile, every kind of block
SMALL = ['model.encoder="32s1,32p4,8s1"', 'model.decoder="8s1,32u4,32s1"', "optim.skip_threshold=0",
         "engine.precision=fp32"]


def _rule(*overrides: str) -> TorchRule:
    torch.manual_seed(0)
    cfg = load("tiny", overrides=[*SMALL, *overrides])
    return TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))


def _images(rule: TorchRule) -> torch.Tensor:
    return torch.randint(0, 256, (rule.micro_batch, *rule.module.data_shape), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


def _loss_and_grads(rule: TorchRule):
    torch.manual_seed(2)  # the same latent noise
    loss = rule.forward(_images(rule)).nelbo.mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in rule.module.named_parameters()}
    rule.module.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_compiled_blocks_train_like_eager(checkpointing):
    eager, compiled = _rule(f"model.checkpoint_activations={checkpointing}"), _rule(
        "engine.compile=default", f"model.checkpoint_activations={checkpointing}")
    assert compiled.compiled is not None and len(compiled.compiled.blocks) == 4
    for _ in range(2):  # the second pass runs the cached graphs
        (l_e, g_e), (l_c, g_c) = _loss_and_grads(eager), _loss_and_grads(compiled)
        assert l_c == pytest.approx(l_e, rel=1e-5)
        for name, g in g_e.items():
            # float rounding differs in fused kernels: tolerance relative to the tensor's scale
            torch.testing.assert_close(g_c[name], g, rtol=1e-3, atol=1e-4 * g.abs().max().item(), msg=name)
    assert compiled.compiled.failure is None
    train_step(compiled, _images(compiled), compiled.cfg.loss, group_sizes(compiled.module), seed=0)


def test_compiling_with_selective_checkpointing_is_refused_naming_both():
    # torch's selective-checkpoint policy around a compiled block gave wrong gradients
    with pytest.raises(ValueError, match="engine.compile='default'.*checkpoint_activations = selective"):
        load("tiny", overrides=["engine.compile=default", "model.checkpoint_activations=selective"])


def test_a_compiler_that_fails_falls_back_to_eager_and_training_says_why(tmp_path):
    from torch._inductor import config as inductor

    from vdvae_dist.train.local import train_local

    lines = []
    cfg = load("tiny", overrides=[*SMALL, "engine.compile=default", "optim.total_steps=2", "optim.batch_size=4",
                                  f"train.output={tmp_path}", "data.crops_per_image=8", "train.grid_samples=4",
                                  "engine.device=cpu"])
    # a machine without a working C++ compiler: inductor's CPU code cannot be built
    with inductor.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),), "fx_graph_cache": False}):
        summary = train_local(cfg, log=lambda *a: lines.append(" ".join(map(str, a))))
    said = [line for line in lines if line.startswith("compile:")]
    assert len(said) == 1 and said[0].startswith("compile: off (engine.compile=default failed, training in eager:")
    assert summary["step"] == 2 and all(torch.isfinite(torch.tensor(v)) for v in [summary["test_bits_per_dim"]])
