"""An MLflow outage while training runs: logging calls neither raise nor stop training, and
logging resumes when the server is back (a real `mlflow server`, stopped and restarted)."""
import json
import urllib.error
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


class FirstTryFails:
    """An HTTP proxy in front of a real MLflow server that answers 503 to the first request
    of each kind (path and which body fields are set), and forwards everything else: every
    call that starts a run meets one failure and must be retried."""

    def __init__(self, target: str):
        import http.server
        import threading

        self.failed: list[tuple] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                return None

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fields = json.loads(body) if body else {}
                kind = (self.path.split("?")[0], tuple(sorted(k for k, v in fields.items() if v not in ([], None, ""))))
                if kind not in proxy.failed:
                    proxy.failed.append(kind)
                    answer = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}).encode()
                    self.send_response(503)
                else:
                    request = urllib.request.Request(target + self.path, data=body or None, method=self.command,
                                                     headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(request, timeout=30) as r:
                            status, answer = r.status, r.read()
                    except urllib.error.HTTPError as e:
                        status, answer = e.code, e.read()
                    self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_every_call_that_starts_a_run_is_retried(tmp_path, monkeypatch, mlflow_server):
    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retries, not MLflow's own
    monkeypatch.setattr(MlflowTracker, "start_backoff_s", (0.1, 0.5))
    proxy = FirstTryFails(mlflow_server)
    try:
        cfg = load("tiny", overrides=[f"tracking.uri={proxy.url}", "tracking.experiment=first-try-fails",
                                      f"train.output={tmp_path / 'run'}"])
        tracker = MlflowTracker(cfg, world=3)
        tracker.finish()
    finally:
        proxy.close()
    kinds = {(path.split("/mlflow/", 1)[-1], fields) for path, fields in proxy.failed}
    # the experiment looked up and created, the run created, its params and its tags logged
    assert {"experiments/get-by-name", "experiments/create", "runs/create"} <= {path for path, _ in kinds}
    assert {("runs/log-batch", ("params", "run_id")), ("runs/log-batch", ("run_id", "tags"))} <= kinds
    run = json.loads(urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={tracker.run_id}",
                                            timeout=10).read())["run"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["optim.lr"] == str(cfg.optim.lr)
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["world_size"] == "3"
