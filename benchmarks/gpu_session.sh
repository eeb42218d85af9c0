#!/usr/bin/env bash
# All the GPU work of one short session with a borrowed GPU, in order of value, each step under its own time
# limit so that a slow step cannot take the rest with it. Everything lands in $OUT (default ./gpu-out): the logs
# and JSON rows packed in $OUT/gpu-session.tar.gz (a device call returns few files), the tables also printed.
#
#   mkdir -p .carry/MNIST && cp ../shared/data/MNIST/*.gz .carry/MNIST/     # the machine gets the repo, not ../shared
#   FEDGAN_DATA=.carry/MNIST bash benchmarks/gpu_session.sh
#
# On a CPU (to try the script) every step runs at a small size. Steps on a GPU: the tests there (Triton kernels,
# engine vs reference, CUDA graphs, determinism, checkpoints, the clients on streams), the throughput benchmark
# (K = 1, 10, 100 and a full-preset round, the thin layers' other forms and the clients on 8 CUDA streams
# alongside; K = 10 for 94 steps, a full-preset round's length), the benchmark with cuDNN autotuned (with the
# loop), the clients on 16 streams, bfloat16's throughput,
# same seed twice (check_determinism), memory at K = 100 and 1,000 at 10% (bench_memory), the convolution
# forms' probe at K = 10 and 100, the Triton kernels' tile sweep. bfloat16's quality (check_bfloat16.py), measured in
# earlier sessions, runs on the CPU only. Prints a line per step; about 6 minutes on an H200.
#
# SKIP="throughput_bfloat16 conv_forms tile_sweep" leaves those steps out (what an earlier session measured at
# unchanged code).
# STUDY_SEEDS="0 1 2" ends with the sync study's cells at the full preset (study_cells.py) from those seeds, one
# cell after another with all its seeds, in the time left; its JSON is rewritten after every run, so a cell cut
# off by the budget loses only itself. STUDY_CELLS="FedAvg / dir0.1;FedAvgM / dir0.1" picks the cells (default:
# the full-preset table of docs/study.md); `study_cells.py --list` names the rest, among them the stronger-baseline
# options' pilot on Dirichlet 0.1 (issue 24) and the GAN layouts and SCAFFOLD on Dirichlet 0.1 and one class a client
# (issue 23).
# Notebook 3 itself at the full preset, session by session, is benchmarks/gpu_notebook.sh (a call of its own).
set -u
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
SKIP=" ${SKIP:-} "
STUDY_SEEDS=${STUDY_SEEDS:-}
export FEDGAN_DATA=${FEDGAN_DATA:-.carry/MNIST} MPLBACKEND=Agg
LOGS="$OUT/logs"
mkdir -p "$LOGS"
: > "$LOGS/summary.txt"
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then GPU=1; else GPU=0; fi

BUDGET=${BUDGET:-500}  # seconds for the whole script (a device call may run 600 s); later steps get what is left

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, say how it ended
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if [[ "$SKIP" == *" $name "* ]]; then
    echo "$name: skipped (SKIP)" | tee -a "$LOGS/summary.txt"
    return 0
  fi
  if [ $((BUDGET - SECONDS)) -lt "$limit" ]; then limit=$((BUDGET - SECONDS)); fi
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped, the budget of $BUDGET s is spent" | tee -a "$LOGS/summary.txt"
    return 1
  fi
  timeout "$limit" "$@" > "$LOGS/$name.txt" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$LOGS/summary.txt"
  return $status
}

"$PYTHON" -c "import fedgan_utils as fu, json; print(json.dumps(fu.env_report(), indent=1))" > "$LOGS/env.txt" 2>&1
"$PYTHON" -c "import triton; print('triton', triton.__version__)" >> "$LOGS/env.txt" 2>&1
if [ "$GPU" = 1 ]; then
  nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
  # -o addopts="": pytest.ini's nbval options (nbval is not on the GPU machine, and the notebooks are not run there)
  step tests_cuda 120 env FEDGAN_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:warnings -p no:cacheprovider \
    -o addopts="" tests/test_triton_conv.py tests/test_convolutions.py tests/test_engine.py tests/test_stacked.py \
    tests/test_precision.py tests/test_models.py tests/test_federation.py \
    tests/test_checkpoints.py
  # the engine as the notebooks run it (deterministic cuDNN, the thin layers in the Triton kernels), the thin
  # layers' other forms and the clients on CUDA streams alongside
  step throughput 180 "$PYTHON" benchmarks/bench_throughput.py --steps 20 --repeats 2 \
    --compare-forms grouped,block:10 --compare-maps streams --json "$LOGS/throughput.json"
  # K=10 at the length of a full-preset round (94 local steps: one epoch over 6,000 images), best of 3
  step throughput_epoch 90 "$PYTHON" benchmarks/bench_throughput.py --ks 10 --steps 94 --repeats 3 \
    --json "$LOGS/throughput_epoch.json"
  # cuDNN autotuned ("auto": vmap's grouped convolutions), with the loop at K=10, where the 12x-the-loop target is
  # nearest (the loop at K=100 would take most of the step's time and no target asks for it)
  step throughput_autotuned 90 "$PYTHON" benchmarks/bench_throughput.py --ks 10 --steps 20 --repeats 2 \
    --nondeterministic --compare-forms triton --compare-maps streams --json "$LOGS/throughput_autotuned.json"
  step streams_16 60 "$PYTHON" benchmarks/bench_throughput.py --ks 10,100 --steps 20 --repeats 2 --no-loop \
    --compare-maps streams --cuda-streams 16 --json "$LOGS/streams_16.json"
  step throughput_bfloat16 60 "$PYTHON" benchmarks/bench_throughput.py --ks 10,100 --steps 20 --repeats 2 --bfloat16 \
    --no-loop --compare-forms grouped --json "$LOGS/throughput_bfloat16.json"  # the loop is float32: its figures are above
  step determinism 40 "$PYTHON" benchmarks/check_determinism.py --json "$LOGS/determinism.json"
  # two rounds of 8 local steps, the trainer (its state and CUDA graphs) kept from the first round to the second
  step memory 90 "$PYTHON" benchmarks/bench_memory.py --local-steps 8 --cases 100:1.0,1000:0.1 \
    --json "$LOGS/memory.json"
  # each layer's forms; the Triton kernels' tile shapes swept on the thin layers
  step conv_forms 100 "$PYTHON" benchmarks/probe_conv_forms.py --ks 10,100 --layers G3,D1 \
    --forms "one model,grouped (vmap),block,triton" --blocks 10 --json "$LOGS/conv_forms.json"
  step tile_sweep 150 "$PYTHON" benchmarks/probe_conv_forms.py --ks 10,100 --layers G3,D1 --forms "one model" \
    --sweep-tiles "$LOGS/triton_tiles.json"
else
  step throughput 300 "$PYTHON" benchmarks/bench_throughput.py --ks 1,2 --steps 2 --repeats 1 --ngf 16 \
    --client-map vmap --compare-forms grouped,block:2 --compare-maps streams --json "$LOGS/throughput.json"
  step tests_cpu 300 "$PYTHON" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_engine.py
  step memory 300 "$PYTHON" benchmarks/bench_memory.py --cases 20:1.0,200:0.1 --ngf 16 --json "$LOGS/memory.json"
  step throughput_bfloat16 300 "$PYTHON" benchmarks/bench_throughput.py --ks 2 --steps 2 --repeats 1 --ngf 16 --bfloat16 \
    --json "$LOGS/throughput_bfloat16.json"
  step bfloat16_quality 300 "$PYTHON" benchmarks/check_bfloat16.py --preset smoke --json "$LOGS/bfloat16_quality.json"
  step determinism 300 "$PYTHON" benchmarks/check_determinism.py --clients 3 --steps 2 --ngf 8 \
    --json "$LOGS/determinism.json"
fi

if [ -n "$STUDY_SEEDS" ]; then  # the cells of docs/study.md's full-preset table, in order of what they tell
  if [ -n "${STUDY_CELLS:-}" ]; then
    IFS=';' read -r -a cells <<< "$STUDY_CELLS"
  else
    cells=("FedAvg / iid" "half, uniform / iid")
    [ "$GPU" = 1 ] && cells+=("half epoch / iid")  # a cell of presets in epochs: the CPU's smoke counts steps
    cells+=("FedAvg / dir0.1" "FedAvgM / dir0.1" "FedAvgM / iid" "Adam kept / iid")
  fi
  # shellcheck disable=SC2086  # the seeds are words
  step study "$BUDGET" "$PYTHON" benchmarks/study_cells.py --preset "$([ "$GPU" = 1 ] && echo full || echo smoke)" \
    --seeds $STUDY_SEEDS --json "$LOGS/study.json" --cells "${cells[@]}"
fi

for log in tests_cuda tests_cpu throughput throughput_epoch streams_16 throughput_bfloat16 throughput_autotuned determinism \
  memory bfloat16_quality conv_forms tile_sweep study; do
  [ -f "$LOGS/$log.txt" ] && { echo "== $log"; tail -n 30 "$LOGS/$log.txt"; }
done
tar -czf "$OUT/gpu-session.tar.gz" -C "$LOGS" . && rm -r "$LOGS"
