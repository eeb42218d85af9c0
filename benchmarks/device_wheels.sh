#!/usr/bin/env bash
# Wheels for a GPU machine whose pip reaches nothing: a Jupyter kernel and nbclient (benchmarks/run_notebook.py
# executes a notebook with them) and dp-accounting (notebook 3's privacy section), for that machine's Python, less
# what its image already has (the device tool's KINDS.md lists it) and two packages the kernel runs without
# (debugpy, its debugger; jedi, its tab completion). Run it here, where pip works; the folder travels with `carry`.
#
#   bash benchmarks/device_wheels.sh                 # .whl/ for Python 3.12, about 11 MB
#   PY=3.11 DEST=/tmp/wheels bash benchmarks/device_wheels.sh
#
# There: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#        export PYTHONPATH=/tmp/site     (benchmarks/gpu_session.sh does both)
set -euo pipefail
PY=${PY:-3.12}
DEST=${DEST:-.whl}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
# the versions this repository's notebooks are run with here
$PIP download -q --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" \
  nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 jupyter_client==8.10.0 dp-accounting==0.6.0
cd "$DEST"
for name in absl_py attrs mpmath numpy packaging psutil pygments python_dateutil scipy typing_extensions wrapt \
  tzdata six debugpy jedi; do
  rm -f "$name"-*.whl
done
ls
du -sh .
