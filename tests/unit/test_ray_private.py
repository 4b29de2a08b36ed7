"""The private Ray names in core/ray_private.py hold for the Ray release installed here, and
that release is the one they were checked against: another release fails the first test, so
an upgrade re-reads each of them before it lands."""
import inspect
import logging

import ray

from vdvae_dist.core import ray_private


def test_installed_ray_is_the_release_the_private_names_were_checked_against():
    assert ray.__version__ == ray_private.CHECKED_RAY, (
        f"ray {ray.__version__} is installed; vdvae_dist/core/ray_private.py was checked against "
        f"{ray_private.CHECKED_RAY}: re-check each private name there, then update CHECKED_RAY")


def test_the_address_record_is_the_file_ray_init_reads():
    path = ray_private.ray_address_file()
    assert path is not None and path.endswith("ray_current_cluster")
    # ray.init() finds the cluster `ray start` recorded by reading this same file
    from ray._private import utils
    assert "get_ray_address_file(temp_dir)" in inspect.getsource(utils.read_ray_address)


def test_train_report_loggers_are_the_loggers_ray_train_reports_through():
    loggers = ray_private.train_report_loggers()
    names = {logger.name for logger in loggers}
    for module in ray_private.TRAIN_REPORT_MODULES:
        assert module in names
        source = inspect.getsource(__import__(module, fromlist=["_"]))
        # each module logs through a module-level logger named after itself or its file
        assert "logging.getLogger(__file__)" in source or "logging.getLogger(__name__)" in source
    assert all(isinstance(logger, logging.Logger) for logger in loggers)


def test_started_ray_here_tells_a_started_cluster_from_none():
    assert not ray.is_initialized()
    assert ray_private.started_ray_here() is False
    ray.init(num_cpus=1, include_dashboard=False, address="local")
    try:
        assert ray_private.started_ray_here() is True
        assert ray_private.running_serve_http() is None  # no Serve on a fresh cluster
    finally:
        ray.shutdown()
    assert ray_private.started_ray_here() is False
