#!/usr/bin/env bash
# The whole loop on qwen2.5-coder-1.5b (device machine, after `bench/qwen_gpu.sh setup` and a rank run in
# /root/runs/rank_robust): sweep rank's short list -> build the best window in both formats (each verified)
# -> eval the layer-list export on the local tasks (paired tests) plus generative GSM8K on a subset ->
# card -> publish --dry-run. Every step's log lands in ~/runs (packed by qwen_gpu.sh).
# Usage: SRC=... bash bench/qwen_loop.sh [items per task for sweep/eval] [generative GSM8K items]
set -uo pipefail
SRC=${SRC:-$PWD}
export PYTHONPATH=$SRC HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RYS_FORGE_CACHE=$HOME/rys-cache
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
LIMIT=${1:-500}; GEN=${2:-200}
Q=$HOME/st/qwen2.5-coder-1.5b.gguf
R=$HOME/runs; mkdir -p "$R"
GPU="--device cuda --dtype bfloat16"
# Builds, verification and eval in float32: bf16 greedy generation with and without the KV cache can part
# ways on near-ties, which verification (rightly) refuses.
EXACT="--device cuda --dtype float32"
TASKS=rys_arc_easy,rys_arc_challenge,rys_piqa,rys_openbookqa,rys_hellaswag,rys_lambada_openai,rys_gsm8k_ll
step() { local label=$1; shift; echo "=== $label: rys-forge $*"; local t=$(date +%s)
  python3 -m rys_forge.cli "$@" > "$R/$label.log" 2>&1; local rc=$?
  echo "=== $label rc=$rc in $(( $(date +%s) - t )) s"; tr '\r' '\n' < "$R/$label.log" | grep -av "^\s*$\|it/s\]\|s/it\]" | tail -n 18; return $rc; }
SHORT=$(python3 -c "import json; print(' '.join('--window ' + r['window'] for r in json.load(open('$R/rank_robust/summary.json'))['top_k']))")
[ -f "$R/sweep_short/summary.json" ] || step sweep_short sweep --model "$Q" $GPU --attn sdpa --tasks $TASKS --limit "$LIMIT" $SHORT --batch-tokens 65536 \
  --out "$R/sweep_short" --no-progress || exit 1
BEST=$(python3 -c "import json; print(json.load(open('$R/sweep_short/summary.json'))['best']['window'])")
echo "best window of the short list: $BEST"
step build_layerlist build --model "$Q" $EXACT --window "$BEST" --out "$R/exports/q15-layerlist" || exit 1
step build_mergekit build --model "$Q" $EXACT --window "$BEST" --format mergekit --out "$R/exports/q15-mergekit" || exit 1
step eval_suite eval "$R/exports/q15-layerlist" $EXACT --tasks $TASKS --limit 1000 --batch-size 64 || exit 1
step eval_gsm8k eval "$R/exports/q15-layerlist" $EXACT --tasks rys_gsm8k --limit "$GEN" --batch-size 64 \
  --out "$R/eval_gsm8k" || true
step card card "$R/exports/q15-layerlist" --rank-run "$R/rank_robust" --repo-id rys-forge/qwen2.5-coder-1.5b-rys
step publish publish "$R/exports/q15-layerlist" --repo-id rys-forge/qwen2.5-coder-1.5b-rys --dry-run --rank-run "$R/rank_robust"
