#!/bin/sh
# The built wheel, not the checkout: `pip wheel --no-deps .`, install it into a fresh
# virtual environment, then from a folder outside the checkout check that the custom-op
# sources are in the installed package and that `tnonnx build-ops` compiles them (it needs
# a C++ compiler and fetches the ONNX Runtime headers, see custom_ops/README.md).
#
#     sh bench/wheel_install.sh [PYTHON]        # default: python3
set -eu
PYTHON=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WORK"/dist/tnonnx-*.whl
cd "$WORK"
"$WORK/venv/bin/python" - <<'PY'
from tnonnx import custom_ops
assert custom_ops.SOURCE.is_file() and "site-packages" in str(custom_ops.SOURCE), custom_ops.SOURCE
print("sources:", custom_ops.SOURCE)
PY
"$WORK/venv/bin/tnonnx" build-ops --out-dir "$WORK/ops"
"$WORK/venv/bin/tnonnx" --version
echo "wheel install and build-ops: ok"
