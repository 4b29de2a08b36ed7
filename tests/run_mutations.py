"""Apply each mutation of tests/mutations/*.toml to a scratch copy of the project and run the
tests named for it: every mutation must make them fail (`make mutations`). Prints one line per
mutation; exits 1 if any survived or no longer applies."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("vdvae_dist", "tests", "pyproject.toml", "docs", "cluster")


def scratch_copy(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "reference*"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    for ref in (ROOT / "tests").glob("reference*"):  # large read-only data: linked, not copied
        (dest / "tests" / ref.name).symlink_to(ref)


def run(mutation: dict) -> str:
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        work = Path(tmp)
        scratch_copy(work)
        target = work / mutation["file"]
        text = target.read_text()
        if text.count(mutation["find"]) != 1:
            return "STALE (the line is gone or not unique: update tests/mutations/)"
        target.write_text(text.replace(mutation["find"], mutation["replace"]))
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *shlex.split(mutation["tests"])]
        env = {**os.environ, "PYTHONPATH": str(work)}
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            return "SURVIVED (the tests still pass)"
        if "no tests ran" in done.stdout or done.returncode == 5:
            return "STALE (the selection runs no test)"
        return "caught"


def main() -> int:
    # an argument selects by source file, by words of `why`, or by list (e.g. `readme.toml`)
    mutations = [{**m, "toml": f.name} for f in sorted((ROOT / "tests" / "mutations").glob("*.toml"))
                 for m in tomllib.loads(f.read_text())["mutation"]]
    only = sys.argv[1] if len(sys.argv) > 1 else None
    failed = 0
    for i, m in enumerate(mutations, 1):
        if only and only not in m["file"] and only not in m["why"] and only != m["toml"]:
            continue
        t0 = time.perf_counter()
        verdict = run(m)
        failed += verdict != "caught"
        print(f"[{i:2d}/{len(mutations)}] {verdict:<8} {time.perf_counter() - t0:5.1f}s  {m['file']}: {m['why']}",
              flush=True)
    print(f"{len(mutations) - failed} caught, {failed} not" if not only else f"{failed} not caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
