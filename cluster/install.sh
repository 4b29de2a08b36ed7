#!/usr/bin/env bash
# The one way the project is installed: `make install` (editable, ./.venv), the Dockerfile
# (the image the cluster configs run) and tests/integration/test_package.py (the wheel in
# a fresh virtual environment) all call this script, so what the test proves is what
# users get.
#
#   cluster/install.sh VENV [PROJECT...]
#
# VENV      the virtual environment (created with $PYTHON, default python3, when missing)
# PROJECT   pip arguments naming the project and its extras; default: "<repo>[serve]"
#           e.g. `-e .[serve,test]` (development) or `dist/vdvae_dist-0.1.0-py3-none-any.whl[serve]`
# TORCH_SPEC       default torch==2.13.0 (a CPU build from local disk on the dev machines)
# TORCH_INDEX_URL  optional index for torch, e.g. https://download.pytorch.org/whl/cu128
#
# Order matters: torch first, from its own index; then the project with its declared
# dependencies, held to the tested pins of requirements.txt (a constraints file); DeepSpeed
# is a source package and builds against the torch already there (--no-build-isolation),
# never against a second torch fetched for its build. The last step fails if torch was
# replaced on the way.
set -euo pipefail

venv=${1:?usage: cluster/install.sh VENV [PROJECT...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
torch_spec=${TORCH_SPEC:-torch==2.13.0}
if [ $# -eq 0 ]; then set -- "$repo[serve]"; fi

test -x "$venv/bin/python" || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip setuptools wheel
"${pip[@]}" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_spec"
"${pip[@]}" install -q --no-build-isolation -c "$repo/requirements.txt" "$@"
"${pip[@]}" check
"$venv/bin/python" - "$torch_spec" <<'EOF'
import sys
import torch

wanted = sys.argv[1].split("==")[-1]
found = torch.__version__.split("+")[0]
if "==" in sys.argv[1] and found != wanted:
    sys.exit(f"torch was replaced during the install: {torch.__version__} (wanted {wanted})")
print(f"installed: torch {torch.__version__}")
EOF
