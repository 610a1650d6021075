#!/usr/bin/env bash
# Create (or re-check) the neural-tangents benchmark environment .venv-nt in
# the repository root.  Idempotent: a second run only verifies the imports.
#
# Pins per BENCHMARKS.md: neural-tangents 0.6.5 works with jax/jaxlib
# 0.4.18-0.4.25 only; its tensorflow/tf2jax requirements serve only
# neural_tangents.experimental, so it is installed with --no-deps and
# bench/nt_worker.py stubs that module.  Never install torch here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-nt"
PY="${NT_PYTHON:-$(command -v python3.11 || true)}"

if [[ -z "$PY" ]]; then
    echo "setup_nt_env.sh: python3.11 not found (set NT_PYTHON)" >&2
    exit 1
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi

check() {
    "$VENV/bin/python" - <<'PY'
import sys, types
sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")
import jax, jaxlib, numpy, neural_tangents as nt
assert jax.__version__ == "0.4.23", jax.__version__
assert numpy.__version__ == "1.26.4", numpy.__version__
print(f"ok: python {sys.version.split()[0]} jax {jax.__version__} "
      f"jaxlib {jaxlib.__version__} numpy {numpy.__version__} "
      f"neural-tangents {nt.__version__}")
PY
}

if check 2>/dev/null; then
    exit 0
fi

"$VENV/bin/python" -m pip install --quiet \
    "jax==0.4.23" "jaxlib==0.4.23" "numpy==1.26.4" "ml_dtypes==0.5.4" \
    "opt_einsum==3.4.0" scipy frozendict
"$VENV/bin/python" -m pip install --quiet --no-deps "neural-tangents==0.6.5"
check
