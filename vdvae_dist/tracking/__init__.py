"""Run tracking: a Tracker protocol, an MLflow implementation (rank 0 only) and a null one."""
from .mlflow_tracker import MlflowTracker, NullTracker, Tracker, make_tracker

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "make_tracker"]
