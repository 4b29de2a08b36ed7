"""What a run holds, read back through MlflowClient: its step images and its console files."""
from __future__ import annotations

CONSOLE_PREFIX = "logs/console-rank0-"


def step_images(client, run_id: str) -> dict[str, set[int]]:
    """key -> steps of the run's step images (mlflow.log_image(key=, step=)). MLflow 3.17
    stores each as images/<key with / as ~>+step+<step>+timestamp+<ms>+<uuid>.png, beside
    a +compressed.webp copy for the UI's thumbnails."""
    found: dict[str, set[int]] = {}
    for entry in client.list_artifacts(run_id, "images"):
        name = entry.path.rsplit("/", 1)[-1]
        if not name.endswith(".png"):
            continue
        key, step_word, step, *_ = name.split("+")
        assert step_word == "step", name
        found.setdefault(key.replace("~", "/"), set()).add(int(step))
    return found


def console_text(client, run_id: str) -> str:
    """The run's rank-0 console files (one per attempt), joined."""
    import tempfile
    from pathlib import Path

    paths = sorted(e.path for e in client.list_artifacts(run_id, "logs") if e.path.startswith(CONSOLE_PREFIX))
    assert paths, f"no {CONSOLE_PREFIX}*.log in run {run_id}"
    with tempfile.TemporaryDirectory() as tmp:
        return "".join(Path(client.download_artifacts(run_id, p, tmp)).read_text() for p in paths)
