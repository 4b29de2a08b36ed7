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


def test_a_run_start_waits_for_a_tracking_server_that_comes_up_late(tmp_path, monkeypatch):
    """A worker (re)starting during an outage: the experiment, run, params and tags calls
    are retried until the server answers, instead of failing the worker."""
    import logging
    import threading

    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retries, not MLflow's own
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(MlflowTracker, "start_timeout_s", 180.0)
    monkeypatch.setattr(MlflowTracker, "start_backoff_s", (0.5, 2.0))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    refused, retries = threading.Event(), []

    class Seen(logging.Handler):
        def emit(self, record):
            retries.append(record.getMessage())
            refused.set()

    handler = Seen(level=logging.WARNING)
    logging.getLogger("vdvae_dist.tracking.mlflow_tracker").addHandler(handler)
    started = {}

    def start_late():  # only once the tracker has found the server down
        if refused.wait(timeout=120):
            started["server"] = start_mlflow_server(tmp_path, port)

    late = threading.Thread(target=start_late)
    late.start()
    with_secret = url.replace("http://", "http://alice:s3cret@")
    cfg = load("tiny", overrides=[f"tracking.uri={with_secret}", f"train.output={tmp_path / 'run'}"])
    try:
        tracker = MlflowTracker(cfg, world=2)
        tracker.finish()
        assert retries and "retrying" in retries[0] and "127.0.0.1" in retries[0]
        assert not [m for m in retries if "s3cret" in m]
        assert tracker.url.startswith("http://***@127.0.0.1") and "s3cret" not in tracker.url
        run = json.loads(urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={tracker.run_id}",
                                                timeout=10).read())["run"]
        assert {p["key"]: p["value"] for p in run["data"]["params"]}["optim.lr"] == str(cfg.optim.lr)
        assert {t["key"]: t["value"] for t in run["data"]["tags"]}["world_size"] == "2"
    finally:
        logging.getLogger("vdvae_dist.tracking.mlflow_tracker").removeHandler(handler)
        refused.set()
        late.join(timeout=120)
        if "server" in started:
            started["server"].terminate()
            started["server"].wait(timeout=30)
