#!/usr/bin/env bash
# Install bertflow's virtualenv at /opt/bertflow/venv (run as root): Python 3.11 (the version
# the tests run), every dependency pinned by constraints.txt (torch 2.13.0 from PyPI: its
# Linux wheel is the CUDA 13.0 build, which needs an NVIDIA driver >= 580), and bertflow
# itself from the project folder.
#
#   sudo bash deploy/aws/install-venv.sh PROJECT_DIR
#
# Idempotent and quick when nothing changed: the multi-GB dependency install runs only when
# /opt/bertflow/venv lacks the stamp of this project's constraints.txt + pyproject.toml (an
# image baked with deploy/aws/build-image.sh has it, so a node started from that image
# installs nothing but bertflow's own code, in seconds). On a GPU node it checks the
# driver first and that torch sees the GPUs last, so a bad image fails setup loudly
# instead of joining as a node whose training crashes.
set -euo pipefail

PROJECT=$(cd "${1:?usage: install-venv.sh PROJECT_DIR}" && pwd)
PREFIX=${BERTFLOW_PREFIX:-/opt/bertflow}   # the tests point it elsewhere
VENV=$PREFIX/venv
UV_VERSION=0.13.8        # uv, from PyPI; it installs the pinned Python and the wheels
PYTHON_VERSION=3.11      # the Python minor version the test suite runs on
MIN_DRIVER_MAJOR=580     # CUDA 13.0 (torch 2.13.0's PyPI wheel) needs driver >= 580
. "$(dirname "$0")/lib.sh"

if ! mkdir -p "$PREFIX" 2>/dev/null || [ ! -w "$PREFIX" ]; then
    echo "install-venv.sh: run as root (sudo): it writes $PREFIX" >&2
    exit 1
fi

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if has_gpu; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n1)
    if [ "${driver%%.*}" -lt "$MIN_DRIVER_MAJOR" ]; then
        echo "bertflow: NVIDIA driver $driver is too old for torch 2.13.0's CUDA 13.0 build" \
             "(needs >= $MIN_DRIVER_MAJOR): use the image named in cluster.yaml" >&2
        exit 1
    fi
fi

stamp=$(cat "$PROJECT/constraints.txt" "$PROJECT/pyproject.toml" \
        | { sha256sum; echo "python $PYTHON_VERSION uv $UV_VERSION"; } | sha256sum | cut -c1-16)
export UV_PYTHON_INSTALL_DIR=$PREFIX/python UV_CACHE_DIR=$PREFIX/cache/uv UV_NO_PROGRESS=1
uv=$PREFIX/uv/bin/uv

if [ ! -f "$VENV/.deps-$stamp" ]; then
    echo "bertflow: installing the pinned dependencies into $VENV (stamp $stamp)"
    if [ ! -x "$uv" ] || [ "$("$uv" --version | awk '{print $2}')" != "$UV_VERSION" ]; then
        python3 -m venv "$PREFIX/uv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$PREFIX/uv"; }
        "$PREFIX/uv/bin/pip" install -q "uv==$UV_VERSION"
    fi
    if [ ! -x "$VENV/bin/python" ] || \
       ! "$VENV/bin/python" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$PYTHON_VERSION'.split('.'))))"; then
        rm -rf "$VENV"
        "$uv" python install "$PYTHON_VERSION"
        "$uv" venv -q --python "$PYTHON_VERSION" "$VENV"
    fi
    "$uv" pip install -q --python "$VENV/bin/python" -c "$PROJECT/constraints.txt" "$PROJECT[server]"
    rm -f "$VENV"/.deps-*
    touch "$VENV/.deps-$stamp"
fi

# bertflow's own code, every time (seconds: no dependency is touched).
"$uv" pip install -q --python "$VENV/bin/python" --no-deps --reinstall-package bertflow "$PROJECT"
chmod -R a+rX "$PREFIX"

if has_gpu; then
    "$VENV/bin/python" -c "import torch, sys; n = torch.cuda.device_count(); \
print(f'bertflow: torch {torch.__version__} (CUDA {torch.version.cuda}) sees {n} GPU(s)'); \
sys.exit(0 if n else 1)" || { echo "bertflow: torch sees no GPU on this GPU node" >&2; exit 1; }
fi
