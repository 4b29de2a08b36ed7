"""vdvae-dist: Efficient-VDVAE training at cluster scale (Ray + DeepSpeed), tracked with
MLflow and served with Ray Serve. Importing the package has no side effects."""

__version__ = "0.1.0"
