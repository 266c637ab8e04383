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
source "$(dirname "$0")/device_jobs.sh"
( cd ~/runs && for d in */; do tar czf "$OUT/${d%/}.tgz" "$d"; done; cp *.log "$OUT/" 2>/dev/null ) || true
ls -la "$OUT"
