"""Make a bare GPU machine ready for `make test-gpu`, offline: say what it has and what the
check needs, then install only the missing packages from the wheels `make gpu-wheels` built
(build/gpu-wheels, carried with the checkout) into a side folder put first on PYTHONPATH.

    python tests/gpu/prepare.py WHEELS SITE

Needs: Linux x86_64, the Python the wheels were built for (the name of the wheelhouse's
PYTHON file), torch 2.13 with CUDA already installed, pip. Uses no network. Ray, MLflow and
the embedded datasets are not carried (Ray's wheel alone is larger than the carry budget):
the tests that need them skip and say so."""
from __future__ import annotations

import importlib.metadata as md
import platform
import re
import subprocess
import sys
from pathlib import Path


def dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def main(wheels: Path, site: Path) -> int:
    built_for = (wheels / "PYTHON").read_text().strip() if (wheels / "PYTHON").exists() else None
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    print(f"python {here} on {platform.machine()}; the wheels were built for python {built_for}")
    try:
        import torch
    except ImportError:
        print("needs torch (2.13, a CUDA build) installed on this machine: it is not carried", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); "
          + (f"device: {torch.cuda.get_device_name(0)}" if cuda else "no CUDA device: the GPU tests will skip"))
    if not torch.__version__.startswith("2.13"):
        print(f"note: checked against torch 2.13; this machine has {torch.__version__}")
    missing = []
    sys.path.insert(0, str(site))  # what an earlier run installed there counts as present
    for wheel in sorted(wheels.glob("*.whl")):
        try:
            found = md.version(dist_name(wheel))
            print(f"  have    {dist_name(wheel)} {found}")
        except md.PackageNotFoundError:
            missing.append(wheel)
            print(f"  install {wheel.name}")
    if missing and built_for != here and any("-cp" in w.name for w in missing):
        print(f"needs python {built_for} for the binary wheels (rebuild here with "
              f"`make gpu-wheels GPU_PYTHON={here}`)", file=sys.stderr)
        return 2
    if missing:
        site.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, missing)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
