"""The run's source as MLflow shows it: the command the user ran (`vdvae-dist launch`,
`jobs/train.py`), not the process that happens to log. Ray Train workers run Ray's
`default_worker.py`, so the driver computes these tags and hands them to rank 0."""
from __future__ import annotations

import sys
from pathlib import Path

from ..artifacts.storage import redact

CLI_NAME = "vdvae-dist"


def _is_cli(program: Path) -> bool:
    """The console script, or `python -m vdvae_dist.cli` (argv[0] is then the module's file)."""
    package = Path(__file__).resolve().parents[1]
    return program.name == CLI_NAME or (program.suffix == ".py" and program.resolve().parent == package)


def entry_point(argv: list[str] | None = None) -> str:
    """`vdvae-dist <command>` for the CLI, else the script as typed (relative to the working
    directory when inside it), without credentials."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return "<console>"  # MLflow's own name for an interactive session
    program = Path(argv[0])
    if _is_cli(program):
        command = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else ""
        return f"{CLI_NAME} {command}".strip()
    try:
        shown = str(program.resolve().relative_to(Path.cwd().resolve())) if program.is_absolute() else argv[0]
    except ValueError:  # outside the working directory: the full path says more
        shown = argv[0]
    return redact(shown)


def _code_location(argv: list[str]) -> str | None:
    """The file whose git checkout ran: the script, or this package for the CLI."""
    if not argv or not argv[0]:
        return None
    program = Path(argv[0])
    return str(Path(__file__).resolve()) if _is_cli(program) else argv[0]


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """mlflow.source.* tags of this process's entry point, git commit included when the code
    runs from a git checkout (the repository URL without credentials)."""
    from mlflow.entities import SourceType
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL,
                                          MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE)

    argv = list(sys.argv if argv is None else argv)
    tags = {MLFLOW_SOURCE_NAME: entry_point(argv), MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL)}
    where = _code_location(argv)
    if where is not None:
        git = {MLFLOW_GIT_COMMIT: git_utils.get_git_commit(where), MLFLOW_GIT_BRANCH: git_utils.get_git_branch(where),
               MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(where)}
        tags.update({k: redact(v) for k, v in git.items() if v})
    return tags
