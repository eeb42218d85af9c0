#!/usr/bin/env bash
# All the GPU work of one short session with a borrowed GPU, in order of value, each step under its own time
# limit so that a slow step cannot take the rest with it. Everything lands in $OUT (default ./gpu-out): the logs
# and JSON rows packed in $OUT/gpu-session.tar.gz (a device call returns few files), the tables also printed.
#
#   mkdir -p .carry/MNIST && cp ../shared/data/MNIST/*.gz .carry/MNIST/     # the machine gets the repo, not ../shared
#   FEDGAN_DATA=.carry/MNIST bash benchmarks/gpu_session.sh
#
# On a CPU (to try the script) every step runs at a small size. Steps: the throughput benchmark (K = 1, 10, 100
# and a full-preset round, the engine's other convolution forms alongside), the engine-vs-reference and CUDA-graph
# tests on the GPU, the convolution forms' probe, amp's throughput, memory at K = 100/200 and 1,000, amp's quality
# check. Prints a line per step.
set -u
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
export FEDGAN_DATA=${FEDGAN_DATA:-.carry/MNIST} MPLBACKEND=Agg
LOGS="$OUT/logs"
mkdir -p "$LOGS"
: > "$LOGS/summary.txt"
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then GPU=1; else GPU=0; fi

BUDGET=${BUDGET:-450}  # seconds for the whole script (a device call may run 600 s); later steps get what is left

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, say how it ended
  local name=$1 limit=$2 start=$SECONDS
  shift 2
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
if [ "$GPU" = 1 ]; then
  nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
  # the engine as the notebooks run it, with the other forms of the thin convolutions timed alongside
  step throughput 220 "$PYTHON" benchmarks/bench_throughput.py --steps 20 --repeats 2 \
    --compare-forms grouped,loop,block:2,block:5,block:25,block:100 --json "$LOGS/throughput.json" ||
    step throughput_grouped 150 "$PYTHON" benchmarks/bench_throughput.py --steps 20 --repeats 2 --conv-form grouped \
      --json "$LOGS/throughput.json"  # vmap's own convolutions, should the other forms fail
  # -o addopts="": pytest.ini's nbval options (nbval is not on the GPU machine, and the notebooks are not run there)
  step tests_cuda 100 env FEDGAN_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:warnings -p no:cacheprovider \
    -o addopts="" tests/test_engine.py tests/test_models.py tests/test_federation.py tests/test_checkpoints.py
  step conv_forms 100 "$PYTHON" benchmarks/probe_conv_forms.py --layers G2,G3,D1,D2 \
    --forms "one model,grouped (vmap),loop,block" --blocks 2,5,10,25,50,100 --json "$LOGS/conv_forms.json"
  step throughput_amp 45 "$PYTHON" benchmarks/bench_throughput.py --ks 10 --steps 20 --repeats 2 --amp \
    --compare-forms grouped,block:5 --json "$LOGS/throughput_amp.json"
  step throughput_amp_100 45 "$PYTHON" benchmarks/bench_throughput.py --ks 100 --steps 20 --repeats 2 --amp \
    --no-loop --compare-forms grouped,block:5,block:25 --json "$LOGS/throughput_amp_100.json"  # loop: float32 anyway
  step memory 60 "$PYTHON" benchmarks/bench_memory.py --local-steps 8 --json "$LOGS/memory.json"
  step amp_quality 90 "$PYTHON" benchmarks/check_amp.py --preset full --rounds 6 --json "$LOGS/amp_quality.json"
else
  step throughput 300 "$PYTHON" benchmarks/bench_throughput.py --ks 1,2 --steps 2 --repeats 1 --ngf 16 \
    --client-map vmap --compare-forms grouped,block:2 --json "$LOGS/throughput.json"
  step tests_cpu 300 "$PYTHON" -m pytest -q -p no:warnings -p no:cacheprovider tests/test_engine.py
  step memory 300 "$PYTHON" benchmarks/bench_memory.py --cases 20:1.0,200:0.1 --ngf 16 --json "$LOGS/memory.json"
  step throughput_amp 300 "$PYTHON" benchmarks/bench_throughput.py --ks 2 --steps 2 --repeats 1 --ngf 16 --amp \
    --json "$LOGS/throughput_amp.json"
  step amp_quality 300 "$PYTHON" benchmarks/check_amp.py --preset smoke --json "$LOGS/amp_quality.json"
fi

for log in tests_cuda tests_cpu throughput throughput_grouped memory conv_forms throughput_amp throughput_amp_100 \
  amp_quality; do
  [ -f "$LOGS/$log.txt" ] && { echo "== $log"; tail -n 30 "$LOGS/$log.txt"; }
done
tar -czf "$OUT/gpu-session.tar.gz" -C "$LOGS" . && rm -r "$LOGS"
