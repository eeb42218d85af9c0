#!/usr/bin/env bash
# All the GPU work of one short session with a borrowed GPU, in order of value, each step under its own time
# limit so that a slow step cannot take the rest with it. Everything lands in $OUT (default ./gpu-out).
#
#   mkdir -p .carry/MNIST && cp ../shared/data/MNIST/*.gz .carry/MNIST/     # the machine gets the repo, not ../shared
#   FEDGAN_DATA=.carry/MNIST bash benchmarks/gpu_session.sh
#
# On a CPU (to try the script) every step runs at a small size. Steps: the throughput benchmark (K = 1, 10, 100
# and a full-preset round), the engine-vs-reference tests on the GPU, memory at K = 100/200 and 1,000, amp's
# throughput and its quality check. Prints a line per step; each step's own output is in $OUT/<step>.txt.
set -u
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
export FEDGAN_DATA=${FEDGAN_DATA:-.carry/MNIST} MPLBACKEND=Agg
mkdir -p "$OUT"
: > "$OUT/summary.txt"
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then GPU=1; else GPU=0; fi

BUDGET=${BUDGET:-570}  # seconds for the whole script (a device call may run 600 s); later steps get what is left

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, say how it ended
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if [ $((BUDGET - SECONDS)) -lt "$limit" ]; then limit=$((BUDGET - SECONDS)); fi
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped, the budget of $BUDGET s is spent" | tee -a "$OUT/summary.txt"
    return
  fi
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

"$PYTHON" -c "import fedgan_utils as fu, json; print(json.dumps(fu.env_report(), indent=1))" > "$OUT/env.txt" 2>&1
if [ "$GPU" = 1 ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  step throughput 200 "$PYTHON" benchmarks/bench_throughput.py --steps 10 --json "$OUT/throughput.json"
  step tests_cuda 100 env FEDGAN_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:warnings -p no:cacheprovider \
    tests/test_engine.py tests/test_federation.py tests/test_checkpoints.py
  step memory 120 "$PYTHON" benchmarks/bench_memory.py --json "$OUT/memory.json"
  step throughput_amp 90 "$PYTHON" benchmarks/bench_throughput.py --ks 10,100 --steps 5 --repeats 2 --amp \
    --json "$OUT/throughput_amp.json"
  step amp_quality 180 "$PYTHON" benchmarks/check_amp.py --preset full --rounds 6 --json "$OUT/amp_quality.json"
else
  step throughput 300 "$PYTHON" benchmarks/bench_throughput.py --ks 1,2 --steps 2 --repeats 1 --ngf 16 \
    --json "$OUT/throughput.json"
  step tests_cpu 300 "$PYTHON" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_engine.py
  step memory 300 "$PYTHON" benchmarks/bench_memory.py --cases 20:1.0,200:0.1 --ngf 16 --json "$OUT/memory.json"
  step throughput_amp 300 "$PYTHON" benchmarks/bench_throughput.py --ks 2 --steps 2 --repeats 1 --ngf 16 --amp \
    --json "$OUT/throughput_amp.json"
  step amp_quality 300 "$PYTHON" benchmarks/check_amp.py --preset smoke --json "$OUT/amp_quality.json"
fi
