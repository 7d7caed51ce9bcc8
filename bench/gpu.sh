#!/usr/bin/env bash
# The prepared GPU check (one H100 80 GB or H200 141 GB, under 9.5 minutes), random weights of Qwen2.5-Math-7B's
# exact shapes (tests/tiny_model.py SHAPES["7b"]); first the correctness check no test can run (the test suite
# is CPU-only), at Qwen2.5-Math-1.5B's shapes:
#   check_optimizer  evaluate.MasterAdamW offloaded (fp32 master in pinned host RAM beside a bf16 model on the GPU:
#                  pinned buffers, side stream, events) vs torch.optim.AdamW on fp32 copies, 3 steps: the largest
#                  |weight difference|, grad-norm difference, model == bf16(master) (bench/check_optimizer.py)
# then the speed runs:
#   em_ft_auto     em_ft's update at the One-shot EM recipe (64 rollouts x <= 512 tokens), fp32 master + AdamW
#                  placed by memory as em_ft.py does (H200: on the GPU; H100: on the CPU), with its breakdown
#   em_ft_offload  the same with the optimizer forced to the CPU (pinned async copies + fused CPU AdamW), batch 8
#   em_rl          one em_rl step (policy + reference model, 16 sequences x (128 + 256) tokens), breakdown
#   generate       static (HF generate) vs vLLM, greedy, 128 prompts x 256 tokens (EOS ignored), bf16: tokens/s,
#                  start-up apart, rows that agree (bench/bench_generate.py; vLLM where the machine has it)
#   em_inf         em_inf.py's EM-INF and adaptive temperature vs plain sampling, batch 64 x 128 tokens
#   rollouts       em_ft.py and em_rl.py end to end, --rollout-engine static vs vllm: rollout tokens/s, s per
#                  update/step (bench/bench_rollouts.py; vllm where the machine has it; last: skipped if no time)
# Each step runs under its own time limit (and a total budget); a step that fails or times out is recorded and the
# next one runs. Results: one JSON line per step (rc, wall time, the bench's RESULT records, the output's tail) in
# $OUT/gpu_results.jsonl, or bench_out/gpu_results.jsonl without $OUT; full logs beside it.
#
#   bash bench/gpu.sh                        # on the GPU machine
#   GPU_SH_SHAPE=tiny bash bench/gpu.sh      # CPU smoke run: tiny model, small sizes, the same steps
set -u
cd "$(dirname "$0")/.."
SHAPE=${GPU_SH_SHAPE:-7b}
PY=${PYTHON:-python}
DIR=${OUT:-bench_out}
mkdir -p "$DIR"
RES=$DIR/gpu_results.jsonl
: > "$RES"
START=$(date +%s)
BUDGET=${GPU_SH_BUDGET:-$([ "$SHAPE" = tiny ] && echo 1200 || echo 560)}  # seconds for all steps together
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of BUDGET), append one JSON line
  local name=$1 limit=$2 left
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped (budget spent)"
    echo "{\"step\": \"$name\", \"skipped\": \"total budget of ${BUDGET}s spent\"}" >> "$RES"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local log=$DIR/gpu_$name.log t0
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 12 "$log"
  "$PY" - "$name" "$rc" "$t0" "$log" "$*" >> "$RES" <<'EOF'
import json, sys, time
name, rc, t0, log, cmd = sys.argv[1:]
lines = open(log, errors="replace").read().splitlines()
print(json.dumps({"step": name, "rc": int(rc), "timed_out": int(rc) in (124, 137), "command": cmd,
                  "wall_s": round(time.time() - float(t0), 1),
                  "results": [json.loads(x[len("RESULT "):]) for x in lines if x.startswith("RESULT ")],
                  "tail": [x[-400:] for x in lines if not x.startswith("RESULT ")][-15:]}))
EOF
}

if [ "$SHAPE" = tiny ]; then  # sizes that run in seconds on a CPU
  FT="--batch-size 8 --max-new-tokens 32"; FT_OFF="--batch-size 4 --max-new-tokens 16"
  RL="--batch 8 --prompt-len 32 --new-tokens 16"; GEN="--n-prompts 8 --prompt-len 16 --max-new-tokens 16"
  INF="--batch-size 4 --new-tokens 16"; L=(300 300 300 300 300 300 300 300)
  ROLL="--batch-size 4 --max-new-tokens 8 --steps 2 --engines static"
  CHECK=tiny; CHECK_OPT="--chunk 3000"
else
  FT=""; FT_OFF="--batch-size 8 --max-new-tokens 128"
  RL="--batch 16 --prompt-len 128 --new-tokens 256"
  GEN="--n-prompts 128 --max-new-tokens 256"
  INF="--batch-size 64 --new-tokens 128"; L=(110 100 80 75 60 60 60 120)
  ROLL="--batch-size 64 --max-new-tokens 256 --steps 2"
  CHECK=1.5b; CHECK_OPT=""
fi

step env 30 "$PY" -c "import torch, transformers, json; c = torch.cuda.is_available(); print('RESULT ' + json.dumps({
  'torch': torch.__version__, 'transformers': transformers.__version__, 'shape': '$SHAPE',
  'device': torch.cuda.get_device_name() if c else 'cpu', 'cpus': torch.get_num_threads(),
  'gpu_gib': torch.cuda.get_device_properties(0).total_memory / 2**30 if c else None}))"
# shellcheck disable=SC2086
step check_optimizer "${L[5]}" "$PY" bench/check_optimizer.py --shape "$CHECK" $CHECK_OPT
# shellcheck disable=SC2086  # the size variables are word lists on purpose
step em_ft_auto "${L[0]}" "$PY" bench/bench_em_ft.py --shape "$SHAPE" --steps 2 --ref-rollouts 0 --json $FT
# shellcheck disable=SC2086
step em_ft_offload "${L[1]}" "$PY" bench/bench_em_ft.py --shape "$SHAPE" --steps 2 --ref-rollouts 0 --json \
  --offload-optimizer $FT_OFF
# shellcheck disable=SC2086
step em_rl "${L[2]}" "$PY" bench/bench_em_rl.py --shape "$SHAPE" --train-steps 2 --no-compare --json $RL
# shellcheck disable=SC2086
step generate "${L[3]}" "$PY" bench/bench_generate.py --shape "$SHAPE" --json $GEN
# shellcheck disable=SC2086
step em_inf "${L[4]}" "$PY" bench/bench_em_inf.py --shape "$SHAPE" --repeats 1 $INF
# shellcheck disable=SC2086
step rollouts "${L[7]}" "$PY" bench/bench_rollouts.py --shape "$SHAPE" --json $ROLL

echo "== done in $(($(date +%s) - START)) s: $RES"
"$PY" - "$RES" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['step']:>18}: " + (r["skipped"] if "skipped" in r else
          f"rc {r['rc']}{' (timed out)' if r['timed_out'] else ''}, {r['wall_s']} s, {len(r['results'])} results"))
EOF
