"""The stack's known noise is dropped from the main job's console, and nothing else is."""
import io
import logging
import sys

from vdvae_dist.launch import quiet

NOISE = ["[WARNING] **** You are using ZeRO with an untested optimizer, proceed with caution *****",
         "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
         "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"]
KEPT = ["step 2/4  loss 0.7118  bits/dim 1.033", "DeepSpeed failed to build op X",
        "Setting accelerator to CUDA", "untested optimizer settings in your config"]


def _records(logger_name: str, messages: list[str]) -> list[str]:
    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for message in messages:
            logger.warning(message)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return got


def test_deepspeed_and_root_logger_drop_the_noise_only(monkeypatch):
    monkeypatch.setattr(logging.getLogger("DeepSpeed"), "filters", [])
    monkeypatch.setattr(logging.getLogger(), "filters", [])
    quiet.quiet_deepspeed_logs("")
    quiet.quiet_deepspeed_logs("")  # twice: one filter
    assert len(logging.getLogger("DeepSpeed").filters) == 1
    for name in ("DeepSpeed", ""):
        assert _records(name, NOISE + KEPT) == KEPT


def test_worker_stdout_drops_noise_lines_whole_and_keeps_the_rest(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(logging.getLogger("DeepSpeed"), "filters", [])
    monkeypatch.setattr(logging.getLogger(), "filters", [])
    quiet.quiet_worker_console()
    quiet.quiet_worker_console()
    assert sys.stdout._stream is out  # wrapped once
    print(NOISE[2])
    sys.stdout.write(KEPT[0][:5])  # a line written in pieces
    sys.stdout.write(KEPT[0][5:] + "\n" + NOISE[0] + "\n" + KEPT[1])
    sys.stdout.flush()
    assert out.getvalue() == KEPT[0] + "\n" + KEPT[1]


def test_preemption_watcher_off_only_where_unset(monkeypatch):
    monkeypatch.delenv(quiet.PREEMPTION_WATCHER_ENV, raising=False)
    quiet.without_preemption_watcher_here()
    import os
    assert os.environ[quiet.PREEMPTION_WATCHER_ENV] == "0"
    monkeypatch.setenv(quiet.PREEMPTION_WATCHER_ENV, "1")
    quiet.without_preemption_watcher_here()
    assert os.environ[quiet.PREEMPTION_WATCHER_ENV] == "1"
