"""The serve.* settings of issue 11 and the Serve config file that exposes the service."""
from pathlib import Path

import pytest
import yaml

from vdvae_dist.config import load

ROOT = Path(__file__).parents[2]


def test_a_serve_config_open_to_other_machines_requires_a_token():
    spec = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    (app,) = spec["applications"]
    cfg = load(overrides=app["args"]["set"])
    assert spec["http_options"]["host"] not in ("127.0.0.1", "localhost", "::1")
    assert cfg.serve.auth_token_env == "VDVAE_SERVE_TOKEN"
    assert not cfg.serve.fault_injection  # the test-only hook stays off


def test_new_serve_fields_have_safe_defaults_and_bounds():
    s = load().serve
    assert s.auth_token_env == "" and s.fault_injection is False and s.host == "127.0.0.1"
    assert s.request_timeout_s > 0 and s.health_check_period_s > 0
    for bad in ("serve.request_timeout_s=0", "serve.health_check_period_s=-1", "serve.fault_injection=1"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            load(overrides=[bad])
