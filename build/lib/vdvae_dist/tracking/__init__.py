"""Every MLflow call: the run tracker (mlflow_tracker.py: a Tracker protocol, MLflow on rank 0,
a null one), the shards as dataset inputs (datasets.py), the run's source (source.py), the
EMA weights as a pyfunc model (pyfunc_model.py, pyfunc_entry.py), weights by MLflow URI
(logged_weights.py) and evaluations as nested runs (evaluation_run.py)."""
from .mlflow_tracker import MlflowTracker, NullTracker, Tracker, make_tracker

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "make_tracker"]
