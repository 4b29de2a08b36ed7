"""Ray Serve sampling service: an HTTP ingress (FastAPI) in front of a model deployment
that batches concurrent requests. Uses the model and the weights loader, never DeepSpeed."""
