"""An MLflow outage while training runs: logging calls neither raise nor stop training, and
logging resumes when the server is back (a real `mlflow server`, stopped and restarted)."""
import json
import urllib.request

import numpy as np
import pytest

from tests.conftest import free_port, start_mlflow_server
from vdvae_dist.config import load

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_mlflow_outage_does_not_stop_training(tmp_path, monkeypatch, caplog):
    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker

    # MLflow's own HTTP retries would wait minutes per call before failing; keep the test short
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(MlflowTracker, "attempts", 2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    cfg = load("tiny", overrides=[f"tracking.uri={url}", f"train.output={tmp_path / 'run'}"])
    tracker = MlflowTracker(cfg)
    tracker.log_metrics({"loss": 1.0}, step=1)
    server.terminate()
    server.wait(timeout=30)
    tracker.log_metrics({"loss": 2.0}, step=2)  # the server is gone: neither call raises
    tracker.log_image(np.zeros((4, 4, 3), dtype=np.uint8), "samples", step=2)
    assert tracker.dropped == 1 and "failed 2 times, skipped (training continues)" in caplog.text
    server = start_mlflow_server(tmp_path, port)
    try:
        tracker.log_metrics({"loss": 3.0}, step=3)
        tracker.finish()
        query = f"{url}/api/2.0/mlflow/metrics/get-history?run_id={tracker.run_id}&metric_key=loss"
        history = json.loads(urllib.request.urlopen(query, timeout=10).read())["metrics"]
        assert {1, 3} <= {m["step"] for m in history}  # logging resumed after the outage
    finally:
        server.terminate()
        server.wait(timeout=30)
