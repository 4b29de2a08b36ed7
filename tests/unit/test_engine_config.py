"""The typed config -> DeepSpeed config translation (no DeepSpeed import needed)."""
import pytest

from vdvae_dist.config import load
from vdvae_dist.engine.config import deepspeed_config
from vdvae_dist.train.rule import batch_split
from vdvae_dist.core.seeding import noise_seed


def cfg(*overrides):
    return load("tiny", overrides=["optim.batch_size=8", "optim.clip_norm=200", *overrides])


def test_micro_batches_and_accumulation_from_global_batch_and_world():
    ds = deepspeed_config(cfg("scaling.workers=2", "engine.micro_batch_size=2"), world=2, bf16=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    ds = deepspeed_config(cfg(), world=4, bf16=True)  # micro_batch_size 0: the whole per-worker batch
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 1)


def test_a_world_size_the_batch_does_not_split_into_is_refused():
    with pytest.raises(ValueError, match="optim.batch_size=8 .* multiple of the 3 workers"):
        batch_split(cfg(), world=3)
    with pytest.raises(ValueError, match="engine.micro_batch_size=4 .* divisor of the per-worker batch 2"):
        batch_split(cfg("engine.micro_batch_size=4"), world=4)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stages_clipping_and_elastic_checkpoints(stage):
    ds = deepspeed_config(cfg(f"engine.zero_stage={stage}"), world=1, bf16=True)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"].get("elastic_checkpoint", False) == (stage in (1, 2))
    assert ds["gradient_clipping"] == 200
    # fp32 stage 0 steps the torch optimizer directly: our step guard clips after the skip decision
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert deepspeed_config(cfg("engine.zero_stage=0"), world=1, bf16=False)["gradient_clipping"] == 0
    assert not deepspeed_config(cfg(), world=1, bf16=False)["bf16"]["enabled"]


def test_noise_seed_depends_only_on_the_global_position():
    seeds = {noise_seed(1, step, micro) for step in range(50) for micro in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert noise_seed(1, 3, 4) == noise_seed(1, 3, 4) != noise_seed(2, 3, 4)
