"""Ray Serve sampling service: one deployment whose replicas hold both the HTTP routes
(FastAPI) and the model, batching concurrent requests into one forward pass. Uses the config, the model, the
artifacts (weights, images) and tracking (weights by MLflow URI); nothing of training,
DeepSpeed or the data pipeline.

- `app.py`: the application Ray Serve imports: routes, the deployment, `build` / `build_app`
- `process.py`: the serving process: signals, starting and stopping Serve and Ray, `run`
- `http_errors.py`: every error as JSON `{error, field, allowed}` with its status
- `guards.py`: body size limit and bearer token (ASGI middleware)
- `requests.py`: request schemas and their checks against the loaded model (no Ray)
- `batcher.py`: batches form whenever the model is free
- `gate.py`: bounded waits for the model, decoding and encoding; health by forward-pass progress
- `metrics.py`: batch statistics as Ray metrics (Prometheus)
- `sampler.py`: the model on a replica: samples and reconstructions (no Ray)
"""
