"""A training run as MLflow users expect to find it, checked over a real `mlflow server`'s REST
API: a model-training experiment, the user's command as the run's source, the shard splits
as dataset inputs, the EMA weights as a logged (and registered) model that loads back through
load_weights and mlflow.pyfunc. One tiny single-process run feeds most tests."""
import hashlib
import json
import os
import sys
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from vdvae_dist.config import load

REGISTERED = "vdvae-tiny-test"
EXPERIMENT = "test-mlflow-model"


def _api(url, path, body=None):
    req = urllib.request.Request(url + "/api/2.0/mlflow" + path,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def _tags(entity) -> dict:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory):
    """`vdvae-dist train`'s loop (plain-torch rule, local checkpoints) with MLflow on: 3 steps
    on streamed shards, registered under REGISTERED."""
    from vdvae_dist.data.shardwriter import build
    from vdvae_dist.model import build_model
    from vdvae_dist.tracking import make_tracker
    from vdvae_dist.artifacts.run_folder import LocalCheckpoints
    from vdvae_dist.train.loop import Trainer
    from vdvae_dist.train.torch_rule import TorchRule

    tmp = tmp_path_factory.mktemp("run")
    shards = tmp / "shards"
    build("skimage:12", str(shards), 32, val=16, shard_bytes=30_000, progress=False)
    cfg = load("tiny", overrides=["optim.total_steps=3", "train.log_every=3", "train.checkpoint_every=3",
                                  f"train.output={tmp / 'run'}", f"data.shards={shards}", "data.source=",
                                  "data.loader_workers=0", "data.shuffle_buffer=8", "optim.batch_size=4",
                                  "engine.precision=fp32", "train.grid_samples=4", f"tracking.uri={mlflow_server}",
                                  f"tracking.experiment={EXPERIMENT}", f"tracking.register_model={REGISTERED}"])
    torch.manual_seed(0)
    rule = TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))
    store = LocalCheckpoints(tmp / "run" / "checkpoints", 2)
    with pytest.MonkeyPatch.context() as mp:  # as if typed in a shell: the run's source is this command
        mp.setattr(sys, "argv", [os.path.join(os.path.dirname(sys.executable), "vdvae-dist"), "train", "--preset",
                                 "tiny"])
        summary = Trainer(cfg, rule, store, lambda run_id: make_tracker(cfg, 0, run_id), log=lambda *_: None).run()
    run = _api(mlflow_server, f"/runs/get?run_id={summary['mlflow_run_id']}")["run"]
    return {"summary": summary, "run": run, "shards": shards, "output": tmp / "run"}


@pytest.mark.integration
@pytest.mark.slow
def test_the_experiment_is_marked_as_model_training(mlflow_server, trained):
    experiment = _api(mlflow_server, f"/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
    assert _tags(experiment)["mlflow.experimentKind"] == "custom_model_development"
    assert trained["run"]["info"]["experiment_id"] == experiment["experiment_id"]


@pytest.mark.integration
@pytest.mark.slow
def test_an_existing_experiment_gets_a_kind_unless_it_has_one(mlflow_server, tmp_path):
    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker

    _api(mlflow_server, "/experiments/create", {"name": "made-without-kind"})
    _api(mlflow_server, "/experiments/create", {"name": "made-as-genai", "tags": [
        {"key": "mlflow.experimentKind", "value": "genai_development"}]})
    for name, kind in (("made-without-kind", "custom_model_development"), ("made-as-genai", "genai_development")):
        cfg = load("tiny", overrides=[f"tracking.uri={mlflow_server}", f"tracking.experiment={name}",
                                      f"train.output={tmp_path / name}"])
        MlflowTracker(cfg).finish()
        experiment = _api(mlflow_server, f"/experiments/get-by-name?experiment_name={name}")["experiment"]
        assert _tags(experiment)["mlflow.experimentKind"] == kind  # added where missing, a user's choice kept


@pytest.mark.integration
@pytest.mark.slow
def test_the_runs_source_is_the_command_the_user_ran(trained):
    tags = _tags(trained["run"]["data"])
    assert tags["mlflow.source.name"] == "vdvae-dist train"  # MLflow's own would be the script's full path
    assert tags["precision"] == "fp32 (engine.precision=fp32)"  # what the trainer chose, and why
    assert tags["mlflow.source.type"] == "LOCAL"


@pytest.mark.integration
@pytest.mark.slow
def test_the_shard_splits_are_the_runs_dataset_inputs(trained):
    manifest = json.loads((trained["shards"] / "manifest.json").read_text())
    inputs = {_tags(i)["mlflow.data.context"]: i["dataset"] for i in trained["run"]["inputs"]["dataset_inputs"]}
    assert set(inputs) == {"training", "evaluation"}
    for context, split in (("training", "train"), ("evaluation", "val")):
        dataset = inputs[context]
        assert dataset["name"] == manifest["dataset"] == "skimage"
        assert dataset["source_type"] == "local"
        assert json.loads(dataset["source"]) == {"uri": trained["shards"].resolve().as_uri()}
        # the digest is the split's shard hashes: the same bytes give the same dataset version
        shards = sorted((s["name"], s["samples"], s["sha256"]) for s in manifest["shards"] if s["split"] == split)
        assert dataset["digest"] == hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:12]
        assert json.loads(dataset["profile"])["images"] == manifest["splits"][split]
    assert inputs["training"]["digest"] != inputs["evaluation"]["digest"]


@pytest.mark.integration
@pytest.mark.slow
def test_the_ema_weights_are_the_runs_logged_model(mlflow_server, trained):
    run, summary = trained["run"], trained["summary"]
    found = _api(mlflow_server, "/logged-models/search",
                 {"experiment_ids": [run["info"]["experiment_id"]]})["models"]
    ours = [m["info"] for m in found if m["info"].get("source_run_id") == summary["mlflow_run_id"]]
    assert len(ours) == 1 and ours[0]["status"] == "LOGGED_MODEL_READY" and ours[0]["name"] == "vdvae-ema"
    model_id = ours[0]["model_id"]
    assert summary["mlflow_model_uri"] == f"models:/{model_id}"
    assert [o["model_id"] for o in run["outputs"]["model_outputs"]] == [model_id]  # the run page lists it
    metrics = {m["key"] for m in found[[m["info"]["model_id"] for m in found].index(model_id)]["data"]["metrics"]}
    assert "test_bits_per_dim" in metrics  # the run's final scores are the model's
    arts = _api(mlflow_server, f"/artifacts/list?run_id={summary['mlflow_run_id']}&path=model")["files"]
    assert "model/ema_fp32.pt" in {f["path"] for f in arts}  # the plain export stays where it was


@pytest.mark.integration
@pytest.mark.slow
def test_the_training_run_shows_grids_and_figures_as_step_images(mlflow_server, trained):
    """Sample grids, latent utilisation and temperature figures from the final exact pass as
    step images (the Images tab's slider), not loose PNG files."""
    import mlflow

    from PIL import Image

    from tests.mlflow_runs import step_images

    run, summary = trained["run"], trained["summary"]
    images = step_images(mlflow.MlflowClient(mlflow_server), summary["mlflow_run_id"])
    assert images == {key: {3} for key in ("samples", "evaluation/kl_by_group", "evaluation/kl_cumulative",
                                           "evaluation/samples_by_temperature", "reconstructions/by_depth")}
    assert _tags(run["data"])["mlflow.loggedImages"] == "True"
    arts = {f["path"] for f in _api(mlflow_server, f"/artifacts/list?run_id={summary['mlflow_run_id']}")["files"]}
    assert "samples" not in arts and "reconstructions" not in arts
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert 0 <= metrics["active_fraction"] <= 1  # 3 steps: few channels carry information yet
    # the run folder's grid: 4 images of 32 px upscaled 3 times (2 x 2, 2 px padding)
    assert Image.open(trained["output"] / "samples.png").size == (2 * (96 + 2) + 2, 2 * (96 + 2) + 2)


@pytest.mark.integration
@pytest.mark.slow
def test_the_run_keeps_rank_0s_console(mlflow_server, trained):
    import mlflow

    from tests.mlflow_runs import console_text

    text = console_text(mlflow.MlflowClient(mlflow_server), trained["summary"]["mlflow_run_id"])
    assert "step 3/3  loss" in text  # the progress lines the terminal showed


@pytest.mark.integration
@pytest.mark.slow
def test_the_registered_model_loads_through_load_weights_and_pyfunc(mlflow_server, trained):
    import mlflow

    from vdvae_dist.tracking.logged_weights import load_weights

    mlflow.set_tracking_uri(mlflow_server)
    summary = trained["summary"]
    versions = _api(mlflow_server, "/registered-models/get-latest-versions", {"name": REGISTERED})["model_versions"]
    assert [(v["version"], v["run_id"]) for v in versions] == [("1", summary["mlflow_run_id"])]
    assert summary["mlflow_registered_model_uri"] == f"models:/{REGISTERED}/1"
    published = load_weights(str(trained["output"]))
    for uri in (f"models:/{REGISTERED}/latest", summary["mlflow_model_uri"]):
        weights = load_weights(uri)  # what `vdvae-dist serve --model models:/...` reads
        assert weights.step == 3 and weights.source == uri
        for name, tensor in published.model.state_dict().items():
            assert torch.equal(tensor, weights.model.state_dict()[name])
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/latest")
    images = model.predict(pd.DataFrame({"n": [2, 1], "temperature": [0.5, 1.0], "seed": [3, 4]}))
    assert images.dtype == np.uint8 and images.shape == (3, *published.model.data_shape)
    with torch.no_grad():
        want = torch.cat(published.model.sample_batch([(2, 0.5, 3), (1, 1.0, 4)])).numpy()
    assert np.array_equal(images, want)  # the run's EMA weights, each request seeded on its own
    one = model.predict({"n": 1})  # a dict is one request; temperature 1, random seed
    assert one.shape == (1, *published.model.data_shape)
    with pytest.raises(Exception, match="serve.max_n"):
        model.predict({"n": published.cfg.serve.max_n + 1})


@pytest.mark.integration
@pytest.mark.slow
def test_a_failing_model_log_does_not_stop_the_run(mlflow_server, tmp_path, monkeypatch, caplog):
    from vdvae_dist.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.setattr(MlflowTracker, "attempts", 1)
    cfg = load("tiny", overrides=[f"tracking.uri={mlflow_server}", "tracking.experiment=test-failing-model",
                                  f"train.output={tmp_path / 'run'}"])
    tracker = MlflowTracker(cfg)
    assert tracker.log_model(str(tmp_path / "missing" / "ema_fp32.pt"), (3, 32, 32), step=1) == {}
    assert tracker.dropped == 1 and "log_model failed 1 times, skipped (training continues)" in caplog.text
    tracker.finish()
    assert _api(mlflow_server, f"/runs/get?run_id={tracker.run_id}")["run"]["info"]["status"] == "FINISHED"


def test_the_entry_point_names_the_command_without_credentials(tmp_path, monkeypatch):
    from vdvae_dist.tracking.source import entry_point, source_tags

    cli = os.path.join(os.path.dirname(sys.executable), "vdvae-dist")
    assert entry_point([cli, "launch", "--workers", "2"]) == "vdvae-dist launch"
    assert entry_point([cli]) == "vdvae-dist"
    monkeypatch.chdir(tmp_path)
    assert entry_point([str(tmp_path / "jobs" / "train.py"), "--preset", "tiny"]) == "jobs/train.py"
    assert entry_point(["jobs/train.py"]) == "jobs/train.py"
    assert entry_point(["http://alice:s3cret@host/train.py"]) == "http://***@host/train.py"
    assert source_tags(["jobs/train.py"])["mlflow.source.name"] == "jobs/train.py"


def test_dataset_sources_name_the_shards_without_credentials(tmp_path):
    from vdvae_dist.tracking.datasets import FsspecDatasetSource, dataset_source

    s3 = dataset_source("s3://alice:s3cret@bucket/shards")
    assert s3._get_source_type() == "s3" and s3.to_dict() == {"uri": "s3://***@bucket/shards"}
    local = dataset_source(str(tmp_path / "shards"))
    assert local._get_source_type() == "local" and local.to_dict() == {"uri": (tmp_path / "shards").as_uri()}
    other = dataset_source("memory://shards")  # a scheme MLflow has no source for
    assert isinstance(other, FsspecDatasetSource) and other.to_dict() == {"uri": "memory://shards"}
