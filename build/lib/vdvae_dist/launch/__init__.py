"""Ray Train: the driver (ray_train.py), what every worker runs (worker.py) and the
evaluation's shares as Ray tasks (ray_eval.py). The only package that imports ray.train."""
