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


def test_engine_deepspeed_is_merged_into_the_generated_config():
    ds = deepspeed_config(cfg("engine.zero_stage=3", "engine.offload_params=true", "engine.offload_optimizer=true",
                              "engine.deepspeed.zero_optimization.overlap_comm=true",
                              "engine.deepspeed.zero_optimization.stage3_max_live_parameters=1000000",
                              'engine.deepspeed.zero_optimization.offload_param={pin_memory=true}',
                              "engine.deepspeed.flops_profiler={enabled=true, profile_step=3}"), world=1, bf16=True)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is True and z["stage3_max_live_parameters"] == 1_000_000
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}  # refined, not replaced
    assert z["offload_optimizer"] == {"device": "cpu"}
    assert ds["flops_profiler"] == {"enabled": True, "profile_step": 3}
    # offload keeps the project's torch optimizer: DeepSpeed must not demand its CPU Adam
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["zero_allow_untested_optimizer"] is True


def test_every_generated_key_the_user_may_not_set_is_named_in_the_owned_table():
    from vdvae_dist.config.validate import DEEPSPEED_OWNED

    ds = deepspeed_config(cfg(), world=1, bf16=True)
    free = {"zero_optimization", "steps_per_print", "wall_clock_breakdown"}  # tables or cosmetics users may refine
    assert set(ds) - free <= set(DEEPSPEED_OWNED)


@pytest.mark.parametrize("override,field", [
    ("engine.deepspeed.train_batch_size=64", "set optim.batch_size instead"),
    ("engine.deepspeed.zero_optimization.stage=3", "set engine.zero_stage instead"),
    ("engine.deepspeed.optimizer={type=\"Adam\"}", "set optim.* "),
    ("engine.deepspeed.fp16={enabled=true}", "set engine.precision"),
    ('engine.deepspeed.zero_optimization.offload_optimizer={device="nvme"}', "without engine.offload_optimizer = true"),
])
def test_settings_the_project_owns_are_refused_when_the_config_loads(override, field):
    with pytest.raises(ValueError, match="engine.deepspeed.* is out of range") as error:
        cfg(override)
    assert field in str(error.value)


def test_deepspeed_reads_and_checks_the_merged_config():
    from vdvae_dist.engine.config import check_with_deepspeed

    ok = check_with_deepspeed(cfg("engine.deepspeed.zero_optimization.reduce_bucket_size=5e8",
                                  "engine.deepspeed.flops_profiler={enabled=true}",
                                  "engine.deepspeed.activation_checkpointing={partition_activations=false}"))
    assert ok["zero_optimization"]["reduce_bucket_size"] == 5e8
    # DeepSpeed's pydantic model of the ZeRO table: a misspelt key and a wrong type
    with pytest.raises(ValueError, match="engine.deepspeed=.* DeepSpeed's config reader refuses it: .*overlap_com"):
        check_with_deepspeed(cfg("engine.deepspeed.zero_optimization.overlap_com=true"))
    with pytest.raises(ValueError, match="refuses it: .*reduce_bucket_size"):
        check_with_deepspeed(cfg('engine.deepspeed.zero_optimization.reduce_bucket_size="big"'))
    # a top-level key DeepSpeed never reads would be silently ignored by DeepSpeed: refused
    with pytest.raises(ValueError, match="engine.deepspeed.flops_profile is out of range; .* never reads flops_profile"):
        check_with_deepspeed(cfg("engine.deepspeed.flops_profile={enabled=true}"))
    # a setting DeepSpeed removed says so in DeepSpeed's own words
    with pytest.raises(ValueError, match="refuses it: .*[Ee]lastic"):
        check_with_deepspeed(cfg("engine.deepspeed.elasticity={enabled=false}"))
