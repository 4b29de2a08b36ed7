"""Ray Train launches 2 DeepSpeed ZeRO workers on a local Ray cluster; shards streamed."""
import json
import math
import os

import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.data.shardwriter import build

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 endpoint variables must exist before Ray starts its workers
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,  # a new local cluster
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def other_s3():
    """A second S3 server, which the AWS_* variables do not name: reached only through
    data.storage_options / train.storage_options, as a bucket on another endpoint would be.
    Its own process: moto's servers in one process share one store."""
    import subprocess
    import sys

    import boto3

    from tests.conftest import free_port, wait_for_http

    port = free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint + "/moto-api/")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="elsewhere")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _split_from_tars(fs, shards: str, split: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) of every PNG in the split's tar shards, read with tarfile and PIL."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    images = []
    for path in sorted(fs.glob(shards.split("://")[-1] + f"/{split}-*.tar")):
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith(".png"):
                    rgb = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    images.append(np.asarray(rgb).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(images))


@pytest.mark.parametrize("stage, store", [(2, "file"), (3, "s3")])
def test_two_zero_workers_train_checkpoint_and_evaluate(local_ray, tmp_path, stage, store, request):
    from vdvae_dist.artifacts.run_folder import latest_ray_checkpoint as latest_checkpoint
    from vdvae_dist.launch.ray_train import train_distributed

    options = []
    if store == "s3":  # data, Ray's checkpoints and the exports on the endpoint only the options name
        endpoint = request.getfixturevalue("other_s3")
        shards, output = "s3://elsewhere/shards", "s3://elsewhere/run"
        options = [f'data.storage_options={{endpoint_url="{endpoint}"}}',
                   f'train.storage_options={{endpoint_url="{endpoint}"}}']
        build("skimage:12", shards, 32, val=16, shard_bytes=30_000, progress=False,
              storage_options={"endpoint_url": endpoint})
    else:
        shards, output = str(tmp_path / "shards"), str(tmp_path / "run")
        build("skimage:12", shards, 32, val=16, shard_bytes=30_000, progress=False)
    cfg = load("tiny", overrides=[*options, f"engine.zero_stage={stage}", "scaling.workers=2", "optim.batch_size=8",
                                  "optim.total_steps=6", "train.checkpoint_every=3", "train.log_every=3",
                                  f"train.output={output}", f"data.shards={shards}", "data.source=",
                                  "data.loader_workers=0", "data.shuffle_buffer=8", "train.grid_samples=4",
                                  "engine.precision=bf16", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    summary = train_distributed(cfg)
    assert summary["step"] == 6 and summary["world"] == 2 and summary["eval_images"] == 16
    from vdvae_dist.artifacts.storage import join, to_fs

    fs, _ = to_fs(output)
    # the published bound, recomputed outside the training code: the held-out images read
    # straight from the tar shards, the published EMA weights' negative ELBO in fp32. The run
    # measured it in bf16 with other latent noise: < 1% apart on a model 6 steps old, whose
    # KL is a few nats against a reconstruction term of thousands
    from vdvae_dist.tracking.logged_weights import load_weights

    published = load_weights(summary["weights"])  # what evaluate and serve read
    images = _split_from_tars(fs, shards, summary["eval_split"])
    assert len(images) == 16
    with torch.no_grad():
        nats = published.model(images, noise=torch.Generator().manual_seed(0)).nelbo.double().mean().item()
    assert summary["test_bits_per_dim"] == pytest.approx(nats / (3 * 32 * 32 * math.log(2)), rel=1e-2)
    checkpoint = summary["checkpoint"]
    assert checkpoint.startswith("s3://") if store == "s3" else "://" not in checkpoint
    files = {p.rsplit("/", 1)[-1] for p in fs.ls(checkpoint.split("://")[-1], detail=False)}
    assert {"ema-rank00000.pt", "ema-rank00001.pt", "data-rank00000.json", "data-rank00001.json", "ema_fp32.pt",
            "complete-rank00000.json", "complete-rank00001.json"} <= files
    assert latest_checkpoint(cfg) is not None
    import io

    saved = torch.load(io.BytesIO(fs.cat_file(summary["weights"])), weights_only=True)
    from vdvae_dist.config import from_dict
    from vdvae_dist.model import build_model
    model = build_model(from_dict(saved["config"]).model)
    model.load_state_dict(saved["ema"])  # plain fp32 weights, strict
    assert published.step == 6 and published.metrics["test_bits_per_dim"] == pytest.approx(summary["test_bits_per_dim"])
    in_checkpoint = load_weights(checkpoint)  # a checkpoint folder serves as well
    assert in_checkpoint.step == 6 and in_checkpoint.cfg.engine.zero_stage == stage
    for name, tensor in published.model.state_dict().items():
        assert torch.equal(tensor, in_checkpoint.model.state_dict()[name])
    assert json.loads(fs.cat_file(join(output, "summary.json")))["step"] == 6


def _api(url, path, body=None):
    import urllib.request

    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def test_mlflow_records_params_metrics_images_and_model(local_ray, tmp_path, mlflow_server, capfd):
    from vdvae_dist.launch.ray_train import train_distributed

    shards = tmp_path / "shards"
    build("skimage:12", str(shards), 32, val=16, shard_bytes=30_000, progress=False)
    # credentials in the tracking URL (HTTP basic auth) must not be recorded anywhere
    with_secret = mlflow_server.replace("http://", "http://alice:s3cret@")
    cfg = load("tiny", overrides=["scaling.workers=2", "optim.batch_size=8", "optim.total_steps=4",
                                  "train.checkpoint_every=2", "train.log_every=2", "tracking.image_every=2",
                                  f"tracking.uri={with_secret}", "tracking.experiment=test-vdvae",
                                  f"train.output={tmp_path / 'run'}", f"data.shards={shards}", "data.source=",
                                  "data.loader_workers=0", "data.shuffle_buffer=8", "train.grid_samples=4"])
    summary = train_distributed(cfg)
    run_id = summary["mlflow_run_id"]
    assert summary["mlflow_run_url"].startswith("http://***@127.0.0.1")
    out = tmp_path / "run"
    stored = [out / "summary.json", *out.rglob("config.json"), *out.rglob("ema_fp32.pt"), *out.rglob("*.pt")]
    assert stored and not [p for p in stored if b"s3cret" in p.read_bytes()]
    assert "s3cret" not in json.dumps(summary) and "s3cret" not in capfd.readouterr().out
    run = _api(mlflow_server, f"/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["optim.lr"] == "0.001" and params["engine.zero_stage"] == "2"
    assert params["tracking.uri"].startswith("http://***@") and "s3cret" not in json.dumps(run)
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"bits_per_dim", "grad_norm", "skipped", "lr", "images_per_s", "test_bits_per_dim", "kl",
            "kl_group_000", "data_wait_fraction"} <= metrics
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["world_size"] == "2" and run["info"]["status"] == "FINISHED"
    assert tags["checkpoint"].startswith("file://") and tags["checkpoint"] == summary["checkpoint_uri"]
    history = _api(mlflow_server, f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=bits_per_dim")
    assert [m["step"] for m in history["metrics"]] == [2, 4]
    arts = _api(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}")
    top = {f["path"] for f in arts.get("files", [])}
    assert {"model", "images", "logs", "data", "summary.json"} <= top
    from mlflow import MlflowClient

    from tests.mlflow_runs import console_text, step_images

    client = MlflowClient(mlflow_server)
    images = step_images(client, run_id)
    assert images["samples"] == {2, 4} and images["evaluation/samples_by_temperature"] == {4}
    console = console_text(client, run_id)  # rank 0's lines, not rank 1's
    assert "step 2/4  loss" in console and "step 4/4  loss" in console and "MLflow run: http://***@" in console
    assert "s3cret" not in console
    model_files = {f["path"] for f in _api(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=model")["files"]}
    assert "model/ema_fp32.pt" in model_files
    import mlflow

    from vdvae_dist.tracking.logged_weights import load_weights

    mlflow.set_tracking_uri(mlflow_server)
    logged = load_weights(f"runs:/{run_id}/model/ema_fp32.pt")  # the MLflow model URI Serve accepts
    assert logged.step == summary["step"] and logged.source == f"runs:/{run_id}/model/ema_fp32.pt"
    # what the MLflow UI shows: the driver's command as the source (not Ray's default_worker.py),
    # a model-training experiment, the shard splits as datasets, the EMA weights as a logged model
    from vdvae_dist.tracking.source import entry_point

    assert tags["mlflow.source.name"] == entry_point() and "default_worker" not in tags["mlflow.source.name"]
    experiment = _api(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=test-vdvae")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    contexts = {i["tags"][0]["value"] for i in run["inputs"]["dataset_inputs"]}
    assert contexts == {"training", "evaluation"}
    assert [f"models:/{o['model_id']}" for o in run["outputs"]["model_outputs"]] == [summary["mlflow_model_uri"]]
    assert load_weights(summary["mlflow_model_uri"]).step == summary["step"]


def test_evaluate_job_shares_the_split_between_ray_tasks(local_ray, tmp_path):
    """jobs/evaluate.py with 2 Ray tasks on the weights a (single-process) run published:
    every held-out image once, the run's own number, and the evaluation as an MLflow run
    nested under the training run (found through the run's summary.json)."""
    import subprocess
    import sys

    import mlflow
    import ray

    from vdvae_dist.train.local import train_local

    shards, store = tmp_path / "shards", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load("tiny", overrides=["optim.total_steps=3", f"train.output={tmp_path / 'run'}", f"data.shards={shards}",
                                  "data.loader_workers=0", "data.crops_per_image=8", "optim.batch_size=4",
                                  "engine.precision=fp32", "engine.device=cpu", "train.grid_samples=4",
                                  f"tracking.uri={store}"])
    summary = train_local(cfg, log=lambda *_: None, track=True)  # publishes run/ema_fp32.pt and run/summary.json
    out = subprocess.run([sys.executable, "jobs/evaluate.py", "--weights", str(tmp_path / "run"), "--split", "val",
                          "--workers", "2", "--address", ray.get_runtime_context().gcs_address,
                          "--importance-samples", "2", "--depths", "0,1", "--json"],
                         capture_output=True, text=True, check=True).stdout
    s = json.loads(out.strip().splitlines()[-1])
    assert s["images"] == summary["eval_images"] and s["settings"]["shares"] == 2
    assert s["elbo_bits_per_dim"] == pytest.approx(summary["test_bits_per_dim"], rel=1e-2)  # one posterior sample
    mlflow.set_tracking_uri(store)
    run = mlflow.MlflowClient().get_run(s["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    assert run.data.metrics["elbo_bits_per_dim"] == pytest.approx(s["elbo_bits_per_dim"])


def test_a_rerun_of_the_same_output_continues_it(local_ray, tmp_path):
    from vdvae_dist.launch.ray_train import train_distributed

    def cfg(steps):
        return load("tiny", overrides=["scaling.workers=2", "optim.batch_size=4", f"optim.total_steps={steps}",
                                       "train.checkpoint_every=3", "train.log_every=3", "engine.precision=fp32",
                                       f"train.output={tmp_path / 'run'}", "data.crops_per_image=4",
                                       "train.grid_samples=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])

    first = train_distributed(cfg(3))
    again = train_distributed(cfg(6))  # Ray Train restores the run's own latest checkpoint
    assert (first["step"], again["step"]) == (3, 6)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 6]  # steps 1-3 were not trained twice
    assert again["mlflow_run_id"] == first["mlflow_run_id"]  # and MLflow shows one run
    with pytest.raises(ValueError, match="already holds a run"):  # another run's checkpoint would be ignored
        train_distributed(cfg(9), resume=first["checkpoint"] + "-elsewhere")


def test_a_diverging_run_stops_without_ray_retrying_it(local_ray, tmp_path):
    from vdvae_dist.launch.ray_train import train_distributed
    from vdvae_dist.train.rule import TrainingDiverged

    cfg = load("tiny", overrides=["scaling.workers=2", "optim.batch_size=4", "optim.total_steps=20",
                                  "optim.skip_threshold=1e-9", "optim.max_consecutive_skips=2",  # every update skipped
                                  "scaling.max_failures=3", "engine.precision=fp32", "data.crops_per_image=4",
                                  f"train.output={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    # Ray's own retries would end in its TrainingFailedError after 3 more attempts
    with pytest.raises(TrainingDiverged, match="2 consecutive updates skipped"):
        train_distributed(cfg)


def test_a_failing_final_evaluation_keeps_the_weights_and_is_not_retried(local_ray, tmp_path):
    """A held-out image of one rank's share does not decode: every rank stops together, the
    driver raises EvaluationFailed (not Ray's retries), and the published weights stay."""
    from tests.unit.test_run_publish import _break_one_image
    from vdvae_dist.artifacts.weights import load_weights
    from vdvae_dist.launch.ray_train import train_distributed
    from vdvae_dist.train.publish import EvaluationFailed

    shards = tmp_path / "shards"
    build("skimage:12", str(shards), 32, val=8, shard_bytes=3_000, progress=False)  # several val shards
    _break_one_image(shards, "val")
    out = tmp_path / "run"
    cfg = load("tiny", overrides=["scaling.workers=2", "optim.batch_size=4", "optim.total_steps=1",
                                  "scaling.max_failures=3", "engine.precision=fp32", "train.grid_samples=1",
                                  f"train.output={out}", f"data.shards={shards}", "data.source=",
                                  "data.loader_workers=0", "data.shuffle_buffer=4",
                                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(EvaluationFailed, match=r"held-out evaluation failed \(rank \d: .*val-00000"):
        train_distributed(cfg)
    assert load_weights(str(out)).step == 1
