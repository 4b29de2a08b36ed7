"""The start of an MLflow run: a tracking server that never answers fails the start within
tracking's bounded wait, naming the URI without its credentials; a checkpoint's run missing
from the store is a clear error, not a retry loop."""
import pytest

from tests.conftest import free_port
from vdvae_dist.config import load


def test_a_tracking_server_that_never_answers_fails_the_start_naming_it(tmp_path, monkeypatch):
    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker, TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(MlflowTracker, "start_timeout_s", 2.0)
    monkeypatch.setattr(MlflowTracker, "start_backoff_s", (0.2, 0.5))
    port = free_port()  # nothing listens there
    cfg = load("tiny", overrides=[f"tracking.uri=http://alice:s3cret@127.0.0.1:{port}",
                                  f"train.output={tmp_path / 'run'}"])
    with pytest.raises(TrackingUnavailable, match=rf"server http://\*\*\*@127.0.0.1:{port} did not answer") as e:
        MlflowTracker(cfg)
    assert "s3cret" not in str(e.value) and "retried for 2 s" in str(e.value)


def test_resuming_a_run_the_store_does_not_hold_is_a_clear_error(tmp_path):
    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker

    cfg = load("tiny", overrides=[f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"train.output={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="MLflow run 0123456789abcdef0123456789abcdef does not exist in the tracking "
                                         "store sqlite:///"):
        MlflowTracker(cfg, run_id="0123456789abcdef0123456789abcdef")
