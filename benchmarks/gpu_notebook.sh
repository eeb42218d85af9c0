#!/usr/bin/env bash
# Notebook 3 at the full preset on a borrowed GPU, over as many short sessions as it takes. Each session first
# executes section 9 (the stronger baselines' pilot and grid: what issue 24 asks for, so that a session or two
# already measure it) until that has run through once, then sections 1-9 in order (benchmarks/run_notebook.py;
# section 10, Flower, needs flwr, which that machine lacks, and keeps its committed run), until its time is up.
# The cells finished are kept in the notebook's cell store (fu.CellStore, outputs/custom_sync/cells/full), which
# comes back and is carried to the next session with the metric classifier it was scored by, so the sessions add
# up. The session in which every cell is in the store writes the executed notebook.
#
# Here, before the first session (the machine gets the repository, not ../shared, and its pip reaches nothing):
#   mkdir -p .carry/MNIST && cp ../shared/data/MNIST/*.gz .carry/MNIST/
#   bash benchmarks/device_wheels.sh                     # .whl/: nbclient, a Jupyter kernel, dp-accounting
# The device call (carry: .carry/MNIST .whl .carry/full-store.tar.gz once there is one):
#   bash benchmarks/gpu_notebook.sh
# Back here, after each session (files_at: the folder the device tool returned):
#   cp <files_at>/full-store.tar.gz .carry/              # the store and classifier for the next session
#   cp <files_at>/FedGAN_Custom_sync_strategy.ipynb .    # only when the session says it wrote it
# A cell's key holds the package's source: an edit under fedgan/ between sessions makes every stored cell another
# (they would be trained again), so the package stays as it is until the study is done.
#
# On a CPU (to try the script) it runs at the smoke preset. Prints the store's cells before and after, when each
# new cell was finished (cells_finished.txt: what a cell costs with its scoring, for planning the sessions) and every
# stored cell's results (cells.txt: what the sessions have measured so far, the pilot's and grid's too).
set -u
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-540}  # seconds for the notebook; the packing after it takes a few
WHEELS=${WHEELS:-.whl}
STORE_TAR=${STORE_TAR:-.carry/full-store.tar.gz}
mkdir -p "$OUT"
export FEDGAN_DATA=${FEDGAN_DATA:-.carry/MNIST} FEDGAN_CACHE=${FEDGAN_CACHE:-.cache} MPLBACKEND=Agg PYTHONUNBUFFERED=1
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then PRESET=full; else PRESET=smoke; fi
STORE=outputs/custom_sync/cells/$PRESET

if ! "$PYTHON" -c "import nbclient, ipykernel" 2> /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the store and the classifier it was scored by (its key holds the classifier's weights: a retrained one is another)
[ -f "$STORE_TAR" ] && tar -xzf "$STORE_TAR"
before=$(ls "$STORE"/*.pt 2> /dev/null | wc -l)
echo "preset $PRESET | cells in the store before: $before"
mkdir -p "$STORE" && touch "$OUT/started"
start=$SECONDS
# section 9 alone until it has run through once (a line in the store's folder says so), then the whole notebook
if ! grep -qx 9 "$STORE/sections_finished.txt" 2> /dev/null; then
  timeout "$BUDGET" "$PYTHON" benchmarks/run_notebook.py FedGAN_Custom_sync_strategy.ipynb --preset "$PRESET" \
    --sections 9 --out "$OUT/section9.ipynb" > "$OUT/run_section9.txt" 2>&1
  status=$?
  echo "section 9: exit $status after $((SECONDS - start)) s"
  tail -n 25 "$OUT/run_section9.txt"
  [ "$status" = 0 ] && echo 9 >> "$STORE/sections_finished.txt"
fi
left=$((BUDGET - (SECONDS - start)))
if [ "$left" -gt 30 ]; then
  timeout "$left" "$PYTHON" benchmarks/run_notebook.py FedGAN_Custom_sync_strategy.ipynb --preset "$PRESET" \
    --sections 1 2 3 4 5 6 7 8 9 --out "$OUT/FedGAN_Custom_sync_strategy.ipynb" > "$OUT/run_notebook.txt" 2>&1
  status=$?
else
  status=124
  echo "no time left for the whole notebook" > "$OUT/run_notebook.txt"
fi
after=$(ls "$STORE"/*.pt 2> /dev/null | wc -l)
echo "the notebook: exit $status after $((SECONDS - start)) s (limit $BUDGET s); cells in the store after: $after"
tail -n 25 "$OUT/run_notebook.txt"
# when each new cell was finished (seconds since the start): a cell's wall time, its scoring included
find "$STORE" -name '*.pt' -newer "$OUT/started" -printf '%T@ %f\n' | sort -n |
  awk -v t0="$(stat -c %Y "$OUT/started")" '{printf "%7.1f s  %s\n", $1 - t0, $2}' > "$OUT/cells_finished.txt"
cat "$OUT/cells_finished.txt"
# every stored cell's results, oldest first (a baseline's a line a row)
"$PYTHON" -c "import sys, fedgan_utils as fu; print(fu.format_table(fu.CellStore(sys.argv[1]).cells(), ('cell', \
'seed', 'images', 'seconds', 'MB', 'fid', 'cond_acc', 'precision', 'recall', 'coverage')))" "$STORE" > "$OUT/cells.txt"
echo "$(($(wc -l < "$OUT/cells.txt") - 2)) lines in cells.txt; the newest:"; tail -n 30 "$OUT/cells.txt"
if [ "$status" = 0 ]; then
  echo "the notebook is written: $OUT/FedGAN_Custom_sync_strategy.ipynb"
else
  echo "not finished: the next session goes on from the $after cells in the store"
  rm -f "$OUT/FedGAN_Custom_sync_strategy.ipynb"
fi
rm "$OUT/started"
tar -czf "$OUT/full-store.tar.gz" "$STORE" "$FEDGAN_CACHE/classifiers" 2> /dev/null
ls -l "$OUT"
