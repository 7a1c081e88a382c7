#!/usr/bin/env bash
# Run SGLang's own benchmark client, unmodified, against mini-sglang.
#
#   bench/run_bench_serving.sh [NUM_PROMPTS] [REQUEST_RATE] -- [server flags...]
#   e.g. bench/run_bench_serving.sh 8 inf -- --model demo --device cpu
#        bench/run_bench_serving.sh 200 3 -- --model configs/qwen3-0.6b --load_format dummy
#        DATASET=generated-shared-prefix GSP_GROUPS=2 GSP_PROMPTS_PER_GROUP=4 GSP_SYSTEM_LEN=256 \
#          GSP_QUESTION_LEN=32 GSP_OUTPUT_LEN=16 TAG=cache bench/run_bench_serving.sh 0 inf -- --model demo --device cpu
#
# bench_serving.py comes from the sglang 0.4.6.post5 wheel on PyPI and is kept out of the
# repository, in third_party/ (git-ignored). The script starts the server, waits for
# /health, runs the client once per backend, and stops the server. Each client run asks
# for --output-details (per-request ttfts/itls/input_lens/output_lens in the JSONL, for
# bench/plot_serving.py) and --flush-cache (the prefix cache is emptied after the client's
# warm-up, so the second backend does not find the first backend's identical prompts cached).
# After each run it prints how many prompt tokens the server took from its prefix cache.
#
# Env:
#   PORT          server port (default 30123)
#   DATASET       bench_serving --dataset-name: random-ids (default) | random | generated-shared-prefix
#   IN_LEN, OUT_LEN, RANGE_RATIO   random datasets: --random-input-len / --random-output-len /
#                 --random-range-ratio (defaults 256, 64, 0.5; ratio 0 draws lengths from U[1, LEN])
#   GSP_GROUPS, GSP_PROMPTS_PER_GROUP, GSP_SYSTEM_LEN, GSP_QUESTION_LEN, GSP_OUTPUT_LEN
#                 generated-shared-prefix: --gsp-num-groups / --gsp-prompts-per-group /
#                 --gsp-system-prompt-len / --gsp-question-len / --gsp-output-len
#                 (defaults 64, 16, 2048, 128, 256, bench_serving's own). That dataset sends GROUPS x PER_GROUP
#                 prompts and ignores NUM_PROMPTS. bench_serving caches the generated prompts
#                 in ~/.cache/sglang/benchmark, keyed by these five numbers.
#   BACKENDS      default "sglang sglang-oai"
#   RESULTS_DIR   where bench_serving appends its JSONL results (default /tmp)
#   TAG           appended to the result file name: bench_serving_<backend>[_<TAG>].jsonl
#   PYTHON        default python3
set -euo pipefail
NUM=${1:-8}; RATE=${2:-inf}; shift 2 || true; [[ "${1:-}" == "--" ]] && shift
PORT=${PORT:-30123}; IN_LEN=${IN_LEN:-256}; OUT_LEN=${OUT_LEN:-64}; RANGE_RATIO=${RANGE_RATIO:-0.5}
DATASET=${DATASET:-random-ids}
PY=${PYTHON:-python3}
BENCH=third_party/sglang/bench_serving.py
if [[ ! -f $BENCH ]]; then                      # fetch the wheel once, keep only the client
  mkdir -p third_party/wheel && $PY -m pip download -q --no-deps sglang==0.4.6.post5 -d third_party/wheel
  $PY -m zipfile -e third_party/wheel/sglang-0.4.6.post5-py3-none-any.whl third_party/wheel/x
  mkdir -p third_party/sglang && cp third_party/wheel/x/sglang/bench_serving.py $BENCH && rm -rf third_party/wheel
fi
# The client needs a tokenizer, and the served model may be a bare config dir (dummy
# weights) without one. The demo tokenizer is Qwen's real BPE, the one the server falls
# back to for such a dir, so client and server count tokens alike; shared-prefix prompts
# are sent as text, and this keeps the client's prompt lengths true.
TOKENIZER=$($PY -c "from stage1_model.model_source import demo_model_dir; print(demo_model_dir())")

case $DATASET in
  random|random-ids)
    DATA_ARGS=(--num-prompts "$NUM" --random-input-len "$IN_LEN" --random-output-len "$OUT_LEN"
               --random-range-ratio "$RANGE_RATIO") ;;
  generated-shared-prefix)
    DATA_ARGS=(--gsp-num-groups "${GSP_GROUPS:-64}" --gsp-prompts-per-group "${GSP_PROMPTS_PER_GROUP:-16}"
               --gsp-system-prompt-len "${GSP_SYSTEM_LEN:-2048}" --gsp-question-len "${GSP_QUESTION_LEN:-128}"
               --gsp-output-len "${GSP_OUTPUT_LEN:-256}") ;;
  *) echo "DATASET=$DATASET: this script knows random-ids, random, generated-shared-prefix" >&2; exit 2 ;;
esac

$PY -m server.launch_server --port "$PORT" "$@" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server died while starting" >&2; exit 1; }
  sleep 1
done

# The scheduler's running count of prompt tokens served from the prefix cache.
cache_hits() {
  $PY -c "import json, urllib.request as u
info = json.load(u.urlopen('http://127.0.0.1:$PORT/get_server_info', timeout=10))
print(info['internal_states'][0].get('cache_hit_tokens', 0))"
}
flush_cache() {
  $PY -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:$PORT/flush_cache', method='POST'), timeout=10)"
}

for backend in ${BACKENDS:-sglang sglang-oai}; do
  echo "=== bench_serving --backend $backend, $DATASET, rate $RATE ==="
  OUT_FILE="${RESULTS_DIR:-/tmp}/bench_serving_${backend}${TAG:+_$TAG}.jsonl"
  # Flushed here too, so that the client's warm-up request (its first prompt) cannot hit
  # what the previous backend's run left cached: the count below is then the run's own.
  flush_cache
  before=$(cache_hits)
  $PY $BENCH --backend $backend --host 127.0.0.1 --port "$PORT" --dataset-name "$DATASET" "${DATA_ARGS[@]}" \
    --request-rate "$RATE" --tokenizer "$TOKENIZER" --seed 1 --output-details --flush-cache \
    --output-file "$OUT_FILE"
  echo "prefix cache: $(( $(cache_hits) - before )) prompt tokens served from the cache during this run" \
       "(results appended to $OUT_FILE)"
done
