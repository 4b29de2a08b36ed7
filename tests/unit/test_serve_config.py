"""The serve.* settings, the Serve deployment options they make, and the Serve config file
that exposes the service (cluster/serve.yaml)."""
from pathlib import Path

import pytest
import yaml

from vdvae_dist.config import load

ROOT = Path(__file__).parents[2]


def _serve_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())


def test_a_serve_config_open_to_other_machines_requires_a_token():
    spec = _serve_yaml()
    (app,) = spec["applications"]
    cfg = load(overrides=app["args"]["set"])
    assert spec["http_options"]["host"] not in ("127.0.0.1", "localhost", "::1")
    assert cfg.serve.auth_token_env == "VDVAE_SERVE_TOKEN"
    assert not cfg.serve.fault_injection  # the test-only hook stays off


def test_new_serve_fields_have_safe_defaults_and_bounds():
    s = load().serve
    assert s.auth_token_env == "" and s.fault_injection is False and s.host == "127.0.0.1"
    assert s.request_timeout_s > 0 and s.health_check_period_s > 0
    assert s.max_queued_requests == 128
    for bad in ("serve.request_timeout_s=0", "serve.health_check_period_s=-1", "serve.fault_injection=1",
                "serve.max_queued_requests=0", "serve.max_queued_requests=-2"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            load(overrides=[bad])


def test_the_serve_config_file_is_valid_for_serve_and_scales_the_apps_deployment():
    """What `serve deploy` / `serve run` check first (Ray's own ServeDeploySchema), and
    that its deployments block names the deployment the app builds, with back-pressure
    paired as the code pairs it."""
    from ray.serve.schema import ServeDeploySchema

    from vdvae_dist.serve.app import Service, max_ongoing_requests

    spec = _serve_yaml()
    ServeDeploySchema.model_validate(spec)
    (app,) = spec["applications"]
    (dep,) = app["deployments"]
    assert dep["name"] == Service.name
    s = load(overrides=app["args"]["set"]).serve
    scaling = dep["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"] and "num_replicas" not in dep
    assert dep["max_ongoing_requests"] == max_ongoing_requests(s) == 2 * s.max_batch_size
    assert scaling["target_ongoing_requests"] == s.max_batch_size  # one batch running, the next waiting
    assert dep["max_queued_requests"] >= 1  # bounded: excess load gets 503, not an endless queue
    assert dep["ray_actor_options"]["num_gpus"] == 1 and dep["ray_actor_options"]["num_cpus"] >= 1


@pytest.mark.parametrize("setting, option", [
    ("serve.replicas=2", "num_replicas"),
    ("serve.max_replicas=4", "autoscaling_config.max_replicas"),
    ("serve.cpus_per_replica=4", "ray_actor_options.num_cpus"),
    ("serve.gpus_per_replica=1", "ray_actor_options.num_gpus"),
    ("serve.max_queued_requests=16", "max_queued_requests"),
])
def test_a_serve_config_file_cannot_scale_through_args(setting, option):
    from vdvae_dist.serve.app import build_app

    with pytest.raises(ValueError) as e:
        build_app({"model": "s3://bucket/run", "set": ["serve.max_n=4", setting]})
    message = str(e.value)
    assert setting.split("=")[0] in message and option in message and "deployments:" in message
    assert "name: VDVAE" in message


def test_serve_config_args_bind_with_bounded_back_pressure_and_one_cpu_replica():
    from vdvae_dist.serve.app import Service, build_app, deployment_options

    (app,) = _serve_yaml()["applications"]
    assert type(build_app(app["args"])).__name__ == "Application"  # binding only: replicas load the weights
    s = load(overrides=app["args"]["set"]).serve
    options = deployment_options(s, scaling=False)
    assert "num_replicas" not in options and "autoscaling_config" not in options  # the deployments block's
    d = Service.options(**options)
    assert d.num_replicas == 1 and d.ray_actor_options["num_cpus"] == 1 and d.ray_actor_options["num_gpus"] == 0
    assert d.max_ongoing_requests == 32 and d.max_queued_requests == 128
    assert d.backpressure_config.status_code == 503 and d.backpressure_config.retry_after_s == 1


def test_the_serve_command_scales_from_the_config():
    from vdvae_dist.serve.app import Service, deployment_options

    fixed = Service.options(**deployment_options(load(overrides=["serve.replicas=3", "serve.cpus_per_replica=2",
                                                                  "serve.max_batch_size=8"]).serve))
    assert fixed.num_replicas == 3 and fixed.ray_actor_options["num_cpus"] == 2 and fixed.max_ongoing_requests == 16
    options = deployment_options(load(overrides=["serve.replicas=1", "serve.max_replicas=3",
                                                 "serve.max_batch_size=8"]).serve)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8}
    assert "num_replicas" not in options and Service.options(**options).max_ongoing_requests == 16
