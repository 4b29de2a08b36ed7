"""The logged model's code (MLflow "models from code"): MLflow copies this file into the
model and runs it when the model is logged or loaded. Not imported by the package."""
from mlflow.models import set_model

from vdvae_dist.tracking.pyfunc_model import EmaSampler

set_model(EmaSampler())
