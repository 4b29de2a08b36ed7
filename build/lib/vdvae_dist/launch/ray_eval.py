"""The evaluation's shares as Ray tasks: each task reads its rank's part of the held-out
split (every image exactly once over all tasks) and returns its totals."""
from __future__ import annotations

from ..evaluation.measures import Measures
from ..evaluation.report import Runner, measure_share


def ray_runner(cpus_per_task: float = 1.0, gpus_per_task: float = 0.0) -> Runner:
    import ray

    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=2)(measure_share)

    def run(calls: list[dict]) -> list[Measures]:
        return ray.get([task.remote(**kw) for kw in calls])

    return run
