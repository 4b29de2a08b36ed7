"""The official Efficient-VDVAE's own training step, timed beside ours by
`python benchmarks/model_step.py --reference PATH`.

PATH is a checkout of Rayhane-mamah/Efficient-VDVAE (its efficient_vdvae_torch/ and egs/). Nothing
of it is copied, edited or written to: a child process imports it from PATH, with a temporary
folder as working directory, and runs it the way its README and train.py do:

- config: egs/<the preset's .cfg> becomes `hparams.cfg` in the working directory and
  `HParams('.', name="efficient_vdvae")` reads it, as train.py does before importing anything else.
  Three values differ from the file: train.batch_size = --batch and run.num_gpus = 1 (its loss is
  divided by batch_size // num_gpus), optimizer.gradient_skip_threshold = 1e30 (the skip check still
  runs, but a large gradient norm at a random init no longer drops the optimizer and EMA update
  from the timed step; only a NaN norm would).
- model, EMA copy, checkpoint dictionary, Adamax + learning-rate schedule: its own code and calls,
  in train.py's order (including the first forward on a ones batch that creates `scale_bias`).
- step: its own `model.model.train_step` (forward, its loss, backward, its gradient norm and skip
  check, its output sampling, its Adamax step, its EMA update, zero_grad), then `schedule.step()`,
  as its training loop does; fp32, --warmup then --steps timed, the median reported.

CPU shims, applied in the child only (the code hard-codes CUDA in a few places):
`Unpoolayer.reset_parameters` allocates on the input's device instead of 'cuda';
`latent_layers.calculate_z` (TorchScript, allocating on 'cuda') is the same computation in Python;
`utils.one_hot` (zeros on 'cuda', used by its output sampling) is the same computation on the
indices' device; `Tensor.cuda` returns the tensor (its Adamax and output sampling call it);
DistributedDataParallel (one process: nothing to all-reduce) is a plain wrapper exposing `.module`,
which train_step uses.
Packages it imports but a training step never uses (tensorboard, prettytable, torch_optimizer) are
stood in for when missing; its `hparams` library (installed from git by its build/Dockerfile, not on
PyPI) is used when installed, otherwise its reading of the .cfg is reproduced (ConfigParser, values
evaluated as Python literals, `name` kept as text).

    python benchmarks/official_step.py --reference PATH --preset cifar10 --mode inspect   # one child
"""
from __future__ import annotations

import argparse
import configparser
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

# our preset -> the official example config of the same network
PRESET_CFGS = {
    "cifar10": "cifar10_baseline.cfg",
    "imagenet32": "imagenet32_baseline.cfg",
    "imagenet64": "imagenet64_baseline.cfg",
    "celeba64": "celebA64_baseline.cfg",
    "ffhq256": "ffhq256_8bits_baseline.cfg",
    "ffhq256-5bit": "ffhq256_5bits_baseline.cfg",
    "ffhq1024": "ffhq1024_baseline.cfg",
    "mnist": "binarized_mnist_baseline.cfg",
}
# packages its modules import at import time that no training step calls, and how to get the real ones
OPTIONAL = {"torch.utils.tensorboard": ("SummaryWriter", "tensorboard"), "prettytable": ("PrettyTable", "prettytable"),
            "torch_optimizer": ("RAdam", "torch_optimizer")}


def source_root(reference: str) -> Path:
    """The checkout's root (PATH itself, or PATH/.. when PATH is its efficient_vdvae_torch/)."""
    path = Path(reference).expanduser().resolve()
    for root in (path, path.parent):
        if (root / "efficient_vdvae_torch" / "model" / "def_model.py").is_file() and (root / "egs").is_dir():
            return root
    raise ValueError(f"--reference {reference}: not an Efficient-VDVAE checkout (expected "
                     f"efficient_vdvae_torch/model/def_model.py and egs/ under it)")


def config_path(reference: str, preset: str) -> Path:
    """The official .cfg for `preset`; ValueError naming what is wrong."""
    if preset not in PRESET_CFGS:
        raise ValueError(f"--preset {preset} has no official Efficient-VDVAE config; with --reference use one of: "
                         f"{', '.join(sorted(PRESET_CFGS))}")
    cfg = source_root(reference) / "egs" / PRESET_CFGS[preset]
    if not cfg.is_file():
        raise ValueError(f"--reference {reference}: {cfg} is missing (needed for --preset {preset})")
    return cfg


# ---------------------------------------------------------------- child process: official code

def _unavailable(name: str, pip: str) -> type:
    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{name} is not installed (pip install {pip})")
    return Unavailable


def _install_stand_ins() -> list[str]:
    """Put stand-ins in sys.modules for optional packages that are missing; their names."""
    missing = []
    for module, (attr, pip) in OPTIONAL.items():
        try:
            __import__(module)
        except ImportError:
            stub = types.ModuleType(module)
            setattr(stub, attr, _unavailable(f"{module}.{attr}", pip))
            sys.modules[module] = stub
            missing.append(pip)
    try:
        from hparams import HParams
        if hasattr(HParams, "get_hparams_by_name"):  # the official library (PyPI's `hparams` is another one)
            return missing
    except ImportError:
        pass
    sys.modules["hparams"] = hp = types.ModuleType("hparams")
    hp.HParams = _HParams
    return missing + ["hparams"]


class _HParams:
    """The official hparams library's reading of `<project_path>/<hparams_filename>.cfg`: sections as
    attributes, every value evaluated (here: as a Python literal; bare words stay text), `name` as text."""
    _loaded: dict[str, _HParams] = {}

    def __init__(self, project_path, hparams_filename="hparams", name="hparams", **_):
        from vdvae_dist.official.hparams import literal

        parser = configparser.ConfigParser(interpolation=None)
        if not parser.read(os.path.join(project_path, f"{hparams_filename}.cfg")):
            raise FileNotFoundError(os.path.join(project_path, f"{hparams_filename}.cfg"))
        for section in parser.sections():
            values = {k: v if k == "name" else literal(v, f"[{section}] {k}") for k, v in parser.items(section)}
            setattr(self, section, types.SimpleNamespace(**values))
        _HParams._loaded[name] = self

    @staticmethod
    def get_hparams_by_name(name):
        return _HParams._loaded[name]


def _write_hparams(cfg: Path, batch: int) -> None:
    """hparams.cfg in the working directory: the official file with the values this benchmark sets."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(cfg)
    parser.set("train", "batch_size", str(batch))
    parser.set("run", "num_gpus", "1")
    parser.set("optimizer", "gradient_skip_threshold", "1e30")
    with open("hparams.cfg", "w") as f:
        parser.write(f)


def _import_official(root: Path):
    """Import the official modules (after hparams.cfg is in place) and apply the CPU shims."""
    sys.path.insert(0, str(root / "efficient_vdvae_torch"))
    from hparams import HParams

    hparams = HParams(".", name="efficient_vdvae")
    from model import layers, latent_layers  # only now: its modules read that object at import

    def reset_parameters(self, inputs):  # official: device='cuda'
        _, c, h, w = inputs.shape
        self.scale_bias = torch.nn.Parameter(torch.zeros(size=(1, c, h, w), device=inputs.device), requires_grad=True)

    def calculate_z(mean, std):  # official: TorchScript drawing eps on 'cuda'
        eps = torch.empty_like(mean).normal_(0., 1.)
        return eps * std + mean, mean, std

    def one_hot(indices, depth, dim):  # official: zeros on 'cuda'
        indices = indices.unsqueeze(dim)
        size = list(indices.size())
        size[dim] = depth
        return torch.zeros(size, device=indices.device).scatter_(dim, indices, 1)

    layers.Unpoolayer.reset_parameters = reset_parameters
    latent_layers.calculate_z = calculate_z
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # Adamax and output sampling move state to 'cuda'
    from model import autoencoder, def_model, model as official_model
    autoencoder.one_hot = one_hot  # its output sampling (part of train_step)
    from utils import utils as official_utils
    return hparams, def_model, official_model, official_utils


def _inputs(hparams, batch: int):
    """Random images preprocessed as its data loaders do: NCHW, floor to num_bits, (u - 127.5) / 127.5;
    binarized MNIST: 0/1 digits zero-padded from 28x28 to 32x32."""
    g = torch.Generator().manual_seed(0)
    d = hparams.data
    if d.dataset_source == "binarized_mnist":
        x = torch.bernoulli(torch.rand(batch, d.channels, 28, 28, generator=g), generator=g)
        return torch.nn.functional.pad(x, (2, 2, 2, 2))
    u = torch.randint(0, 256, (batch, d.channels, d.target_res, d.target_res), generator=g).float()
    step = 2 ** (8 - d.num_bits)
    return (torch.floor(u / step) * step - 127.5) / 127.5


def _inspect(hparams, def_model, official_model, batch: int) -> dict:
    """Parameter count and FLOP per step (forward, its loss, backward) on the meta device: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = def_model.UniversalAutoEncoder()
        model(torch.ones(1, hparams.data.channels, hparams.data.target_res, hparams.data.target_res))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = _inputs(hparams, batch).to("meta")
    torch.distributions.Distribution.set_default_validate_args(False)  # its checks read values (.item())
    try:
        with FlopCounterMode(display=False) as counter:
            predictions, posterior, prior = model(x)
            loss = official_model.compute_loss(x, predictions, posterior_dist_list=posterior,
                                               prior_kl_dist_list=prior, step_n=0, global_batch_size=batch)[2]
            loss.backward()
    except Exception as e:  # the parameter check must not depend on the count
        return {"params": params, "gflop_per_step": None, "flop_error": f"{type(e).__name__}: {e}"}
    return {"params": params, "gflop_per_step": counter.get_total_flops() / 1e9}


class _Replica(torch.nn.Module):
    """What DistributedDataParallel is to train_step with one process: `.module` and a forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _time(hparams, def_model, official_model, official_utils, args) -> dict:
    """Build as train.py does, then time its train_step + schedule.step()."""
    torch.manual_seed(hparams.run.seed)
    model = def_model.UniversalAutoEncoder()
    with torch.no_grad():  # creates the lazy scale_bias parameters, as train.py does
        model(torch.ones((1, hparams.data.channels, hparams.data.target_res, hparams.data.target_res)))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ema_model = copy.deepcopy(model)
    checkpoint, _ = official_utils.create_checkpoint_manager_and_load_if_exists(rank=0)  # none in the temp dir
    o = hparams.optimizer
    optimizer, schedule = official_model.get_optimizer(
        model=model, type=o.type, learning_rate=o.learning_rate, beta_1=o.beta1, beta_2=o.beta2, epsilon=o.epsilon,
        weight_decay_rate=0., decay_scheme=o.learning_rate_scheme, warmup_steps=o.warmup_steps,
        decay_steps=o.decay_steps, decay_rate=o.decay_rate, decay_start=o.decay_start, min_lr=o.min_learning_rate,
        last_epoch=torch.tensor(checkpoint["global_step"]), checkpoint=checkpoint)
    ema_model.load_state_dict(model.state_dict())
    ema_model.requires_grad_(False)
    model = _Replica(model)
    model.train()
    x = _inputs(hparams, args.batch)
    step, times, norms, skipped = checkpoint["global_step"], [], [], 0
    for i in range(args.warmup + args.steps):
        step += 1
        t = time.perf_counter()
        *_, norm, skip = official_model.train_step(model, ema_model, optimizer, x, step)
        schedule.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        norms.append(float(norm))
        skipped += int(skip)
    step_s = statistics.median(times)
    return {"step_s": step_s, "images_per_s": args.batch / step_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "params": params,
            "threads": torch.get_num_threads(), "grad_norms": norms, "skipped_updates": skipped}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    cfg = config_path(args.reference, args.preset)
    stand_ins = _install_stand_ins()
    with tempfile.TemporaryDirectory(prefix="official-step-") as work:
        os.chdir(work)  # its hparams and checkpoint helpers use the working directory
        _write_hparams(cfg, args.batch)
        hparams, def_model, official_model, official_utils = _import_official(source_root(args.reference))
        if args.mode == "inspect":
            out = _inspect(hparams, def_model, official_model, args.batch)
        else:
            out = _time(hparams, def_model, official_model, official_utils, args)
        os.chdir("/")
    out.update(cfg=str(cfg), stand_ins=stand_ins)
    print(json.dumps(out))


# ---------------------------------------------------------------- parent side (model_step.py)

def run(reference: str, preset: str, batch: int, mode: str, steps: int = 1, warmup: int = 0,
        threads: int | None = None) -> dict:
    """One child process (its own peak RSS); its JSON result."""

    cmd = [sys.executable, __file__, "--reference", reference, "--preset", preset, "--batch", str(batch),
           "--mode", mode, "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(threads or torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"official {mode} child failed ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def our_params(preset: str) -> int:
    from vdvae_dist.config import load
    from vdvae_dist.model import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(load(preset).model).parameters() if p.requires_grad)


def check(reference: str, preset: str, batch: int) -> dict:
    """Before any timing: print the official config, any stand-ins, and both parameter counts
    (loudly when they differ); the official network's parameter count and FLOP per step."""
    info = run(reference, preset, batch, "inspect")
    ours = our_params(preset)
    print(f"official: {info['cfg']} (train.batch_size={batch}, run.num_gpus=1, gradient_skip_threshold=1e30)")
    optional = [s for s in info["stand_ins"] if s != "hparams"]
    if "hparams" in info["stand_ins"]:
        print("official: its hparams library is not installed (build/Dockerfile installs it from git): "
              "the .cfg is read the same way by this benchmark")
    if optional:
        print(f"official: not installed, not used by a training step, stood in for: {', '.join(optional)} "
              f"(real ones: pip install {' '.join(optional)})")
    print(f"parameters: official {info['params']:,}, ours {ours:,}", flush=True)
    if info["params"] != ours:
        print(f"WARNING: !!! the official network at {Path(info['cfg']).name} has {info['params']:,} parameters, "
              f"ours at --preset {preset} has {ours:,}: they are not the same network and the comparison "
              f"below is not like for like !!!", flush=True)
    return info


def row(r: dict, rate: float) -> str:
    """A result row in model_step.py's format."""
    return (f"{'official':9s} {'fp32':14s}: {r['images_per_s']:6.2f} img/s  {r['step_s']:6.2f} s/step  "
            f"peak RSS {r['peak_rss_gb']:5.2f} GB  {r['gflop_per_step']:8.0f} GFLOP/step  "
            f"{r['gflops']:6.1f} GFLOP/s = {100 * r['gflops'] / rate:3.0f}% of the fp32 matmul rate  "
            f"{r['params']:,} params")


def report(args, info: dict, rows: dict, rates: dict) -> dict:
    """Time the official step, print its row and ours/official for each of our efficient variants."""
    r = run(args.reference, args.preset, args.batch, "time", args.steps, args.warmup)
    ours32 = rows.get(("efficient", "fp32"))
    if info["gflop_per_step"] is None:  # the same network: our efficient fp32 count, else none
        print(f"official: FLOP count failed ({info['flop_error']}); using ours efficient fp32's")
    r["gflop_per_step"] = info["gflop_per_step"] or (ours32["gflop_per_step"] if ours32 else float("nan"))
    r["gflops"] = r["gflop_per_step"] / r["step_s"]
    print(row(r, rates["fp32"]), flush=True)
    if r["skipped_updates"]:
        print(f"WARNING: the official step skipped {r['skipped_updates']} updates (NaN gradient norm)")
    if ours32 and info["gflop_per_step"] is not None:
        print(f"GFLOP/step counted: official {info['gflop_per_step']:.0f}, ours efficient fp32 "
              f"{ours32['gflop_per_step']:.0f}")
    for key, o in rows.items():
        if key[0] == "efficient":
            print(f"ours/official efficient {'+'.join(map(str, key[1:]))}: speed "
                  f"x{o['images_per_s'] / r['images_per_s']:.2f}, peak RSS x{o['peak_rss_gb'] / r['peak_rss_gb']:.2f}")
    return r


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, metavar="PATH")
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mode", choices=("inspect", "time"), default="inspect")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    child(p.parse_args())
