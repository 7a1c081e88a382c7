#!/usr/bin/env bash
# Run SGLang's own benchmark client, unmodified, against mini-sglang.
#
#   bench/run_bench_serving.sh [NUM_PROMPTS] [REQUEST_RATE] -- [server flags...]
#   e.g. bench/run_bench_serving.sh 8 inf -- --model demo --device cpu
#        bench/run_bench_serving.sh 200 3 -- --model configs/qwen3-0.6b --load_format dummy
#
# bench_serving.py comes from the sglang 0.4.6.post5 wheel on PyPI and is kept out of the
# repository, in third_party/ (git-ignored). The script starts the server, waits for
# /health, runs the client with --backend sglang and with --backend sglang-oai on the
# random-ids dataset, and stops the server. Extra env: PORT (default 30123), IN_LEN, OUT_LEN,
# RANGE_RATIO (--random-range-ratio, default 0.5; 0 draws lengths from U[1, LEN]),
# BACKENDS (default "sglang sglang-oai"), RESULTS_DIR (where bench_serving appends its JSONL
# results; default /tmp).
set -euo pipefail
NUM=${1:-8}; RATE=${2:-inf}; shift 2 || true; [[ "${1:-}" == "--" ]] && shift
PORT=${PORT:-30123}; IN_LEN=${IN_LEN:-256}; OUT_LEN=${OUT_LEN:-64}; RANGE_RATIO=${RANGE_RATIO:-0.5}
PY=${PYTHON:-python3}
BENCH=third_party/sglang/bench_serving.py
if [[ ! -f $BENCH ]]; then                      # fetch the wheel once, keep only the client
  mkdir -p third_party/wheel && $PY -m pip download -q --no-deps sglang==0.4.6.post5 -d third_party/wheel
  $PY -m zipfile -e third_party/wheel/sglang-0.4.6.post5-py3-none-any.whl third_party/wheel/x
  mkdir -p third_party/sglang && cp third_party/wheel/x/sglang/bench_serving.py $BENCH && rm -rf third_party/wheel
fi
TOKENIZER=$($PY -c "from stage1_model.model_source import demo_model_dir; print(demo_model_dir())")

$PY -m server.launch_server --port "$PORT" "$@" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server died while starting" >&2; exit 1; }
  sleep 1
done

for backend in ${BACKENDS:-sglang sglang-oai}; do
  echo "=== bench_serving --backend $backend, $NUM prompts, rate $RATE ==="
  # --tokenizer: the served model may be a bare config dir (dummy weights) without one.
  $PY $BENCH --backend $backend --host 127.0.0.1 --port "$PORT" --dataset-name random-ids \
    --num-prompts "$NUM" --random-input-len "$IN_LEN" --random-output-len "$OUT_LEN" \
    --random-range-ratio "$RANGE_RATIO" --request-rate "$RATE" --tokenizer "$TOKENIZER" --seed 1 \
    --output-file "${RESULTS_DIR:-/tmp}/bench_serving_$backend.jsonl"
done
