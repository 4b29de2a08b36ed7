"""MLflow tracking. The embedded default is a local sqlite store with an explicit artifact
folder under the working directory (`mlruns/`); MLFLOW_TRACKING_URI or tracking.uri
point at a tracking server. Credentials never reach params, tags or printed URLs: every
value passes through artifacts.storage.redact.

What the MLflow UI shows for a run: its experiment marked as model training
(`mlflow.experimentKind`), the command the user ran as its source (source.py), the shard
manifest's splits as dataset inputs (datasets.py), sample grids and figures as step images
(the Images tab's slider), GPU system metrics where NVML finds a GPU (nvidia-ml-py), the
console of rank 0 under logs/ (console_log.py) and, at the end, the EMA weights as a
logged model carrying its code (pyfunc_model.py), registered under tracking.register_model
when set. MLflow's own INFO lines stay off the console unless MLFLOW_LOGGING_LEVEL asks."""
from __future__ import annotations

import itertools
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..artifacts.storage import redact, redact_all
from ..config import RunConfig, flatten
from .source import source_tags

if TYPE_CHECKING:
    from ..data.manifest import Manifest

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# the UI opens an experiment without a kind in its GenAI view; this kind is model training
CUSTOM_MODEL_DEVELOPMENT = "custom_model_development"
CONSOLE_FOLDER = "logs"  # the run's artifact folder for rank 0's console files


class Tracker(Protocol):
    run_id: str | None
    url: str | None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_image(self, image_HWC: np.ndarray, key: str, step: int) -> None: ...
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def log_dataset(self, manifest: Manifest, url: str, split: str, context: str) -> None: ...
    def log_model(self, export_path: str, data_shape_CHW: tuple[int, int, int], step: int) -> dict[str, str]: ...
    def set_tags(self, tags: dict) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id = None
    url = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        return None

    def log_image(self, image_HWC: np.ndarray, key: str, step: int) -> None:
        return None

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        return None

    def log_dict(self, data: dict, artifact_file: str) -> None:
        return None

    def log_dataset(self, manifest: Manifest, url: str, split: str, context: str) -> None:
        return None

    def log_model(self, export_path: str, data_shape_CHW: tuple[int, int, int], step: int) -> dict[str, str]:
        return {}

    def set_tags(self, tags: dict) -> None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        return None


def default_uri(root: str | Path = "mlruns") -> tuple[str, str]:
    """(tracking URI, artifact location) of the embedded local store."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def quiet_mlflow() -> None:
    """MLflow's INFO lines (database set-up, system metrics started and stopped) and its
    artifact progress bars stay off the console; MLFLOW_LOGGING_LEVEL, when set, decides."""
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def resolve_uri(cfg: RunConfig, fallback: str | None = None) -> str:
    """The tracking URI as seen by the process that logs: tracking.uri, else this
    process's MLFLOW_TRACKING_URI (a secret may be mounted on the workers only), else the
    driver's URI passed along (launch/cluster_tracking.py: its own, or its embedded store
    when every worker runs on its node), else an embedded store here."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or fallback or default_uri()[0]


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer while the run started, for start_timeout_s."""


# errors a retry cannot fix: a missing run or experiment, a refused value, missing rights
PERMANENT_ERRORS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST",
                    "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "ENDPOINT_NOT_FOUND"}


def _error_code(e: Exception) -> str | None:
    return getattr(e, "error_code", None)


class MlflowTracker:
    """MLflow from rank 0. Starting the run (experiment, run, params, tags) waits for the
    tracking server, retrying with backoff for start_timeout_s, then fails naming the URI: a
    run that cannot be opened is not silently untracked. Once open, an unreachable server
    never stops training: metrics are sent asynchronously, everything else is retried a few
    times, then logged as a warning."""

    attempts = 3
    start_timeout_s = 300.0  # a restarting tracking server, or a worker restarted during an outage
    start_backoff_s = (1.0, 30.0)  # first wait, longest wait

    def __init__(self, cfg: RunConfig, run_id: str | None = None, world: int = 1, extra_tags: dict | None = None,
                 fallback_uri: str | None = None, source: dict | None = None):
        """source: the entry point's mlflow.source.* tags (source.source_tags() on the driver);
        None takes this process's own."""
        import mlflow

        from .console_log import ConsoleLog

        quiet_mlflow()
        self.mlflow = mlflow
        self.dropped = 0  # calls given up after all attempts
        self.register_name, self.model_kind = cfg.tracking.register_model, cfg.model.kind
        uri = resolve_uri(cfg, fallback_uri)
        self.uri = uri
        artifact_location = None
        if uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside the database
            artifact_location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
        mlflow.set_tracking_uri(uri)
        experiment_id = self._start_call("get or create the experiment", self._experiment, cfg.tracking.experiment,
                                         artifact_location)
        # tags given to start_run win over MLflow's own context tags (argv[0], Ray's default_worker.py
        # in a worker); a resumed run keeps the source it started with
        tags = None if run_id else redact_all(source if source is not None else source_tags())
        try:
            self.run = self._start_call("start_run", mlflow.start_run, run_id=run_id,
                                        experiment_id=None if run_id else experiment_id,
                                        run_name=None if run_id else Path(cfg.train.output.rstrip("/")).name,
                                        tags=tags, log_system_metrics=True)
        except Exception as e:
            if run_id and _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                raise ValueError(f"the checkpoint's MLflow run {run_id} does not exist in the tracking store "
                                 f"{redact(uri)}: it was logged to another store (tracking.uri or "
                                 "MLFLOW_TRACKING_URI changed, or a store of another node's own files); resume with "
                                 "the tracking URI the run was logged to") from None
            raise
        self.run_id = self.run.info.run_id
        base = uri.rstrip("/") if uri.startswith("http") else None
        self.url = redact(f"{base}/#/experiments/{self.run.info.experiment_id}/runs/{self.run_id}" if base else
                          f"mlflow ui --backend-store-uri {uri}  (run {self.run_id})")
        if run_id is None:  # a resumed run keeps the params it started with
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

            # the client splits large batches itself; values longer than its limit are refused
            self._start_call("log_params", mlflow.log_params,
                             {k: redact(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(cfg).items()})
            import torch

            tags = {"world_size": str(world), "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
            tags.update(extra_tags or {})
            self._start_call("set_tags", mlflow.set_tags, redact_all(tags))
        # last, once the run exists: each attempt (a Ray retry, a resume) keeps its own console file
        self.console = ConsoleLog(f"console-rank0-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log")

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        """The experiment's id, created as a model-training experiment, or marked as one when
        it has no kind yet (a kind a user chose is kept)."""
        experiment = self.mlflow.get_experiment_by_name(name)
        if experiment is None:
            return self.mlflow.create_experiment(name, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND_TAG: CUSTOM_MODEL_DEVELOPMENT})
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self._call("set_experiment_tag", self.mlflow.MlflowClient().set_experiment_tag, experiment.experiment_id,
                       EXPERIMENT_KIND_TAG, CUSTOM_MODEL_DEVELOPMENT)
        return experiment.experiment_id

    def _start_call(self, what: str, fn, *args, **kwargs):
        """fn's result, retried with doubling waits while the server does not answer, for at
        most start_timeout_s (each call also waits through MLflow's own HTTP retries,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES); TrackingUnavailable naming the URI after that. An
        error a retry cannot fix (PERMANENT_ERRORS) is raised at once."""
        started = time.monotonic()
        wait, longest = self.start_backoff_s
        for attempt in itertools.count(1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if _error_code(e) in PERMANENT_ERRORS:
                    raise
                left = started + self.start_timeout_s - time.monotonic()
                if left <= 0:
                    raise TrackingUnavailable(
                        f"MLflow tracking server {redact(self.uri)} did not answer while the run started: {what} "
                        f"failed {attempt} times over {time.monotonic() - started:.0f} s (retried for "
                        f"{self.start_timeout_s:g} s); last error: {redact(str(e))}. Check that the server runs and "
                        "that this node reaches it (docs/mlflow.md)") from None
                log.warning("MLflow %s at %s failed (attempt %d), retrying in %.0f s: %s", what, redact(self.uri),
                            attempt, min(wait, left), redact(str(e)))
                time.sleep(min(wait, left))
                wait = min(2 * wait, longest)

    def _call(self, what: str, fn, *args, **kwargs):
        """fn's result, or None once it failed `attempts` times."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # any client or transport error: training goes on
                if attempt == self.attempts:
                    self.dropped += 1
                    log.warning("MLflow %s failed %d times, skipped (training continues): %s", what, attempt,
                                redact(str(e)))
                    return None
                time.sleep(2.0 ** attempt)

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
        # asynchronous: a slow or unreachable server delays MLflow's queue, not the training step
        self._call("log_metrics", self.mlflow.log_metrics, clean, step=step, synchronous=False)

    def log_image(self, image_HWC: np.ndarray, key: str, step: int) -> None:
        """A step image: the run's Images tab shows each key with a slider over steps."""
        self._call(f"log_image {key}", self.mlflow.log_image, image_HWC, key=key, step=step, synchronous=True)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call(f"log_artifact {Path(path).name}", self.mlflow.log_artifact, path, artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._call(f"log_dict {artifact_file}", self.mlflow.log_dict, redact_all(data), artifact_file)

    def log_dataset(self, manifest: Manifest, url: str, split: str, context: str) -> None:
        """One split of the shard manifest as a dataset input (context "training", "evaluation")."""
        self._call(f"log_input {split}", self._log_input, manifest, url, split, context)

    def _log_input(self, manifest: Manifest, url: str, split: str, context: str) -> None:
        from .datasets import shard_dataset

        self.mlflow.log_input(shard_dataset(manifest, url, split), context=context, tags={"split": split})

    def log_model(self, export_path: str, data_shape_CHW: tuple[int, int, int], step: int) -> dict[str, str]:
        """The export as the run's logged model (pyfunc_model.py), registered under
        tracking.register_model when set. Returns the URIs that worked: {"model": models:/<model
        id>, "registered_model": models:/NAME/<version>}."""
        # the model takes the run's metrics at `step` (test bits/dim): send the queued ones first
        self._call("flush_async_logging", self.mlflow.flush_async_logging)
        info = self._call("log_model", self._log_pyfunc, export_path, data_shape_CHW, step)
        if info is None:
            return {}
        uris = {"model": info.model_uri}
        if self.register_name:
            version = self._call(f"register_model {self.register_name}", self.mlflow.register_model, info.model_uri,
                                 self.register_name)
            if version is not None:
                uris["registered_model"] = f"models:/{version.name}/{version.version}"
        return uris

    def _log_pyfunc(self, export_path: str, data_shape_CHW: tuple[int, int, int], step: int):
        import mlflow.pyfunc

        from . import pyfunc_model

        with warnings.catch_warnings():
            # the signature is declared; an input example would make MLflow sample from the model
            # on rank 0 at the end of every run
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            return mlflow.pyfunc.log_model(name=f"{self.model_kind}-ema", python_model=str(pyfunc_model.ENTRY_FILE),
                                           artifacts={pyfunc_model.WEIGHTS_KEY: export_path},
                                           code_paths=[str(pyfunc_model.PACKAGE_DIR)],
                                           signature=pyfunc_model.signature(data_shape_CHW),
                                           pip_requirements=pyfunc_model.requirements(),
                                           model_type=self.model_kind, step=step)

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", self.mlflow.set_tags, redact_all(tags))

    def finish(self, status: str = "FINISHED") -> None:
        path = self.console.close()
        if path.is_file() and path.stat().st_size:
            self._call(f"log_artifact {path.name}", self.mlflow.log_artifact, str(path), CONSOLE_FOLDER)
        self.console.remove()
        self._call("end_run", self.mlflow.end_run, status)


def tag_checkpoint(cfg: RunConfig, fallback_uri: str, run_id: str, uri: str) -> None:
    """Best effort, from the Ray driver: the driver may not reach the tracking server the
    workers logged to."""
    import mlflow

    try:
        mlflow.MlflowClient(resolve_uri(cfg, fallback_uri)).set_tag(run_id, "checkpoint", uri)
    except Exception as e:  # the run and its checkpoint exist either way
        print(f"warning: could not tag MLflow run {run_id} with its checkpoint: {redact(str(e))}", flush=True)


def make_tracker(cfg: RunConfig, rank: int, run_id: str | None = None, world: int = 1, extra_tags=None,
                 fallback_uri: str | None = None, source: dict | None = None):
    """MLflow on rank 0, nothing elsewhere."""
    if rank != 0:
        return NullTracker()
    return MlflowTracker(cfg, run_id, world, extra_tags, fallback_uri, source)
