"""GGUF export bench: export RYS plans of the real built-in GGUFs and print every check's numbers as JSON lines.

For each (model, windows) case: `export_gguf` (time, sizes, sha256), `check_gguf_structure` (transformers'
dequantising loader vs the in-memory repeat) and, when llama-cpp-python is installed, `check_gguf_llamacpp`
(llama.cpp on the export vs the in-memory repeat, beside llama.cpp's quantisation floor on the base).

Usage::

    python bench/gguf_llamacpp.py OUT_DIR [--case gemma-3-270m=4:8 --case smollm2-135m=4:6,20:24 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rys_forge.plan import LayerPlan
from rys_forge.surgery.gguf_export import export_gguf
from rys_forge.gguf_file import (
    base_gguf_path,
    check_gguf_llamacpp,
    check_gguf_structure,
    llamacpp_available,
)

DEFAULT_CASES = ["gemma-3-270m=4:8", "smollm2-135m=10:14", "smollm2-135m=4:6,20:24"]
LAYERS = {"gemma-3-270m": 18, "smollm2-135m": 30, "qwen2.5-coder-1.5b": 28}


def run_case(spec: str, out_dir: Path, llamacpp: bool) -> dict:
    """Export one `model=windows` case and check it; the numbers as one dict."""
    model, _, windows = spec.partition("=")
    plan = LayerPlan.from_windows(windows.split(","), LAYERS[model])
    start = time.perf_counter()
    out = export_gguf(base_gguf_path(model), plan, out_dir / f"{model}-{windows.replace(':', '_')}.gguf")
    row = {"case": spec, "export_s": round(time.perf_counter() - start, 2), "sha256": out.sha256,
           "base_sha256": out.base_sha256, "size": out.size, "base_size": out.base_size,
           "extra_tensor_bytes": out.extra_tensor_bytes, "overhead": out.overhead,
           "size_ratio": out.size / out.base_size, "visits": len(plan.order)}
    start = time.perf_counter()
    row["structure"] = check_gguf_structure(out.path, model, expected_sha256=out.sha256)
    row["structure_s"] = round(time.perf_counter() - start, 2)
    if llamacpp:
        start = time.perf_counter()
        row["llamacpp"] = check_gguf_llamacpp(out.path, model)
        row["llamacpp_s"] = round(time.perf_counter() - start, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the exported GGUF files")
    parser.add_argument("--case", action="append", help="model=i:j[,k:l] (default: %(default)s)")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp check")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    llamacpp = llamacpp_available() and not args.no_llamacpp
    for spec in args.case or DEFAULT_CASES:
        print(json.dumps(run_case(spec, args.out_dir, llamacpp)), flush=True)


if __name__ == "__main__":
    main()
