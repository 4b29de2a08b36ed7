"""cluster/ configs reference the real entry point with arguments it accepts, and ask for
resources the cluster they describe has."""
import argparse
import shlex
from pathlib import Path

import yaml

from vdvae_dist import cli

ROOT = Path(__file__).parents[2]


def _launch_args(entrypoint: str) -> argparse.Namespace:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "jobs/train.py"] and (ROOT / "jobs" / "train.py").exists()
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("launch")
    cli._config_args(p, "mnist-small")
    for flag in ("--data", "--workers", "--gpus-per-worker", "--cpus-per-worker", "--zero-stage", "--output", "--resume"):
        p.add_argument(flag)
    return parser.parse_args(["launch", *argv[2:]])


def test_rayjob_entrypoint_and_resources():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    args = _launch_args(job["spec"]["entrypoint"])
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for g in groups)
    cpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in groups)
    assert int(args.workers) * float(args.gpus_per_worker) <= gpus
    assert int(args.workers) * float(args.cpus_per_worker) <= cpus
    from vdvae_dist.config import load
    cfg = load(args.preset, overrides=[*args.overrides, f"scaling.workers={args.workers}"])  # validates
    assert cfg.optim.batch_size % int(args.workers) == 0


def test_launcher_yaml_is_consistent():
    c = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    assert sum(t["max_workers"] for n, t in types.items() if n != c["head_node_type"]) <= c["max_workers"]
    assert any("torch==2.13.0" in cmd for cmd in c["setup_commands"])


def test_readme_submit_command_parses():
    text = (ROOT / "cluster" / "README.md").read_text()
    block = text.split("```sh\nray job submit", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    args = _launch_args(block[block.index("python jobs/train.py"):])
    assert args.preset == "ffhq256" and args.data.startswith("s3://") and args.output.startswith("s3://")


def test_runtime_env_holds_no_secrets():
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert not any(k.startswith("AWS_") or "SECRET" in k or "TOKEN" in k for k in env.get("env_vars", {}))


def test_serve_config_builds_the_app_with_valid_settings():
    spec = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    (app,) = spec["applications"]
    module, name = app["import_path"].split(":")
    assert module == "vdvae_dist.serve.app"
    from vdvae_dist.config import load
    from vdvae_dist.serve import app as serve_app

    load(overrides=app["args"]["set"])  # the settings validate like --set
    (deployment,) = app["deployments"]  # replicas and resources: Serve's deployment options
    scaling = deployment["autoscaling_config"]
    assert scaling["max_replicas"] >= scaling["min_replicas"] and deployment["ray_actor_options"]["num_gpus"] == 1
    built = getattr(serve_app, name)(app["args"])  # binding only: the replicas load the weights
    assert type(built).__name__ == "Application"
    assert (ROOT / "jobs" / "serve.py").exists()
