"""Behaviour comparison: run the CLI end to end on tiny random models, then diff two such runs.

Made for refactors that must not change behaviour (issue #14). Two modes:

``run OUT``
    Builds tiny random models (``tests/tiny.py``; llama and gemma3_text by default), then runs the CLI as a
    subprocess, ``python -m rys_forge.cli``, for each model: ``rank`` (three windows, few prompts),
    ``build --format layerlist`` and ``build --format mergekit``, ``verify`` of both exports,
    ``eval --limit 20`` on the offline local task ``rys_arc_easy`` (in memory and on both exports) and
    ``card`` (with and without the rank run). Every command runs in its own empty working directory under
    ``OUT/<model>/cwd/<step>/``, so a file a command leaves outside ``--out`` shows up in the comparison.
    stdout, stderr and the exit code of each command are kept under ``OUT/<model>/logs/``;
    ``OUT/manifest.json`` records the commands, which ``rys_forge`` was imported and the sha256 of the input
    models (content only, so two runs can check they started from the same weights).

``compare A B``
    Compares two ``run`` folders file by file and prints a table (file, status); exits 1 on any difference.
    JSON (``.json``, ``.jsonl``), CSV, Markdown/YAML/text and stdout logs are compared after normalisation
    (``Normaliser``): the absolute paths of the run folder, the model folder, the imported package, its
    checkout, the Python installation, the temp dir and the home dir become placeholders; dates, durations,
    software versions and warnings' source line numbers in text become placeholders; JSON keys matching
    ``IGNORED_KEYS`` (timings, dates, software versions) and key paths matching ``IGNORED_PATHS`` (hashes of
    things that contain absolute paths or dates) are dropped, as are CSV columns whose header matches
    ``IGNORED_KEYS``; progress-bar lines are dropped from logs. The table's footer lists every key and
    column actually ignored. Weight files (``*.safetensors``) and every other binary file must be
    byte-identical; PNG plots are equal if their bytes or, failing that, their pixels are. ``--rtol R`` accepts
    numbers equal within a relative tolerance and ``--png-delta N`` plots whose pixels differ by at most
    N/255 (both 0, exact, by default); such files show as "close" and do not fail. Both folders must
    hold the same set of files; files under ``*/cwd/`` are stray files a command wrote into its working
    directory, listed at the end. ``manifest.json``: the input models' sha256 and every exit code must match.
    stderr logs are compared after the same normalisation but only reported ("differs, not counted"): they
    carry library warnings and progress output.

The same models: pass ``--models DIR`` to both runs (made there on the first run; otherwise a temporary
folder each time, and the manifests' input hashes show whether tests/tiny.py rebuilt them byte for byte).

Usage (the baseline from a worktree of the pre-refactor commit; PYTHONPATH must win over the editable
install, which the script checks against --expect-package)::

    git worktree add /work/baseline 5fcadf8
    PYTHONPATH=/work/baseline python bench/compare_behaviour.py run /work/behaviour_baseline \
        --models /work/behaviour_models --expect-package /work/baseline
    python bench/compare_behaviour.py run /work/behaviour_now --models /work/behaviour_models
    python bench/compare_behaviour.py compare /work/behaviour_baseline /work/behaviour_now

Tiny models, 20 items per eval, one torch thread per process: a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = ("llama", "gemma3_text")
WINDOWS = {"llama": ("1:3", "2:4", "2:5"), "gemma3_text": ("1:3", "2:5", "3:6")}
BUILD_WINDOW = {"llama": "2:4", "gemma3_text": "2:5"}
EVAL_TASK = "rys_arc_easy"
EVAL_LIMIT = "20"

# JSON keys dropped before comparing, matched on the key name at any depth: timings, software versions,
# dates, and process facts. Also the column names dropped from CSV files.
IGNORED_KEYS = re.compile(
    r"""^(
        .*(seconds|_secs?|_s|_ms|timestamp|elapsed.*|duration.*)   # timings: ..._s, probe_s, seconds
      | timings? | wall.* | runtime
      | created | date | .*_at | started.* | finished.*              # dates
      | version | versions | .*_version                             # software versions (not task_versions)
      | hostname | pid | cwd | argv
    )$""",
    re.X | re.I,
)
# JSON values dropped, matched on their key path ("/a/b/c"): hashes of things that contain absolute paths
# or dates. config.json records the base model's path and the build date (config.json itself is compared
# after normalisation); the base-results cache key hashes the model path, and the cache file is named by it.
IGNORED_PATHS = re.compile(r"(/files/config\.json|/base_cache/key|/base_cache/path)$")
# Lines of text files/logs dropped before comparing: progress bars.
IGNORED_LINES = re.compile(r"(\bit/s\b|\bs/it\b|examples/s\b|\d%\|)")
DURATION = re.compile(r"\b\d+(\.\d+)?\s?(s|ms|sec|seconds|min)\b")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}([ T_]\d{2}:?\d{2}:?\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})?)?\b|\b\d{8}-\d{6}\b")
VERSIONED = re.compile(r"\b(rys[-_]forge|torch|transformers|lm[-_]eval|peft|mergekit|safetensors|numpy|python|version)"
                       r"(\s*[=:/v|]?\s*)\d+(\.\d+)+[\w.+-]*", re.I)
SOURCE_LINE = re.compile(r"(\.py):\d+:")  # warnings name the source line of the caller


# ----------------------------------------------------------------------------------------------- run


#: The environment every command of the comparison runs in: offline, one thread, no colour, fixed hashing.
FIXED_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg", "COLUMNS": "160",
    "NO_COLOR": "1", "TERM": "dumb",
}


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, **FIXED_ENV, "RYS_FORGE_CACHE": str(cache / "rys"), "HF_DATASETS_CACHE": str(cache / "datasets")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _make_models(archs: list[str], folder: Path) -> dict[str, Path]:
    """Tiny random models (seed 0) from the repo's tests/tiny.py; reused when already there."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import make_tiny_model  # noqa: E402

    out = {}
    for arch in archs:
        target = folder / arch
        if not (target / "config.json").exists():
            make_tiny_model(arch, target)
        out[arch] = target
    return out


def _steps(arch: str, model: Path, root: Path) -> list[tuple[str, list[str]]]:
    """(step name, CLI arguments) for one model, in order."""
    window = BUILD_WINDOW[arch]
    rank_dir, ll, mk = root / "rank", root / "export_layerlist", root / "export_mergekit"
    eval_args = ["--tasks", EVAL_TASK, "--limit", EVAL_LIMIT]
    rank_windows = [a for w in WINDOWS[arch] for a in ("--window", w)]
    return [
        ("rank", ["rank", "-m", str(model), *rank_windows, "--prompts-per-family", "2", "--max-tokens", "16",
                  "--batch-size", "8", "--jacobian-top", "1", "--top-k", "3", "--no-progress", "--out", str(rank_dir)]),
        ("build_layerlist", ["build", "-m", str(model), "--window", window, "--format", "layerlist", "--out", str(ll)]),
        ("build_mergekit", ["build", "-m", str(model), "--window", window, "--format", "mergekit", "--out", str(mk)]),
        ("verify_layerlist", ["verify", str(ll)]),
        ("verify_mergekit", ["verify", str(mk)]),
        ("eval_inmemory", ["eval", "-m", str(model), "--window", window, *eval_args, "--out", str(root / "eval_inmemory")]),
        ("eval_layerlist", ["eval", str(ll), *eval_args]),
        ("eval_mergekit", ["eval", str(mk), *eval_args]),
        ("card_layerlist", ["card", str(ll), "--rank-run", str(rank_dir)]),
        ("card_mergekit", ["card", str(mk)]),
    ]


def run(out: Path, archs: list[str], models_dir: Path | None, expect_package: str | None) -> int:
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    scratch = Path(tempfile.mkdtemp(prefix="rys-behaviour-"))
    env = _env(scratch)
    probe = subprocess.run([sys.executable, "-c", "import rys_forge, sys; print(rys_forge.__file__)"],
                           capture_output=True, text=True, env=env, check=True, cwd=scratch)
    package = Path(probe.stdout.strip()).resolve().parent
    print(f"rys_forge imported from {package}")
    if expect_package and not str(package).startswith(str(Path(expect_package).resolve())):
        sys.exit(f"rys_forge is imported from {package}, not from {expect_package}: check PYTHONPATH")
    models = _make_models(archs, (models_dir or scratch / "models").resolve())
    manifest = {
        "package_dir": str(package),
        "models_dir": str(next(iter(models.values())).parent),
        "inputs": {arch: {f.name: _sha256(f) for f in sorted(p.iterdir()) if f.is_file()} for arch, p in models.items()},
        "runs": [],
    }
    failures = 0
    for arch, model in models.items():
        root = out / arch
        (root / "logs").mkdir(parents=True)
        for step, args in _steps(arch, model, root):
            cwd = root / "cwd" / step
            cwd.mkdir(parents=True)
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "rys_forge.cli", *args], cwd=cwd, env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - started
            (root / "logs" / f"{step}.stdout").write_text(proc.stdout)
            (root / "logs" / f"{step}.stderr").write_text(proc.stderr)
            manifest["runs"].append({"model": arch, "step": step, "args": args, "returncode": proc.returncode,
                                     "seconds": round(seconds, 1)})
            stray = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file())
            print(f"{arch:12s} {step:18s} rc={proc.returncode} {seconds:6.1f}s" + (f"  stray: {stray}" if stray else ""))
            if not stray:
                cwd.rmdir()
            failures += proc.returncode != 0
        cwd_root = root / "cwd"
        if cwd_root.exists() and not any(cwd_root.iterdir()):
            cwd_root.rmdir()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {out} ({failures} command(s) exited non-zero)")
    return 0


# ------------------------------------------------------------------------------------------- compare


class Normaliser:
    """Replaces the absolute paths of one run with placeholders; drops timing/version/date noise."""

    def __init__(self, root: Path):
        manifest = json.loads((root / "manifest.json").read_text())
        package = Path(manifest["package_dir"])
        self.paths = sorted(
            {
                (str(root.resolve()), "<OUT>"),
                (manifest["models_dir"], "<MODELS>"),
                (str(package), "<PKG>"),
                (str(package.parent), "<REPO>"),
                (sys.prefix, "<PREFIX>"),
                (sys.base_prefix, "<PREFIX>"),
                (tempfile.gettempdir(), "<TMP>"),
                (str(Path.home()), "<HOME>"),
            },
            key=lambda pair: -len(pair[0]),
        )

    def text(self, value: str) -> str:
        for path, token in self.paths:
            value = value.replace(path, token)
        value = re.sub(r"<TMP>/[\w.-]+", "<TMP>/*", value)
        value = VERSIONED.sub(r"\1 <VERSION>", value)
        value = DATE.sub("<DATE>", value)
        value = SOURCE_LINE.sub(r"\1:<LINE>:", value)
        return DURATION.sub("<DURATION>", value)

    def lines(self, value: str) -> str:
        return "\n".join(line.rstrip() for line in self.text(value).splitlines() if not IGNORED_LINES.search(line))

    def json(self, value, ignored: set[str], where: str = ""):
        if isinstance(value, dict):
            kept = {}
            for key, item in value.items():
                path = f"{where}/{key}"
                if IGNORED_KEYS.match(str(key)) or IGNORED_PATHS.search(path):
                    ignored.add(str(key) if IGNORED_KEYS.match(str(key)) else re.sub(r"\[\d+\]", "[]", path))
                    continue
                kept[self.text(str(key))] = self.json(item, ignored, path)
            return kept
        if isinstance(value, list):
            return [self.json(item, ignored, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, str):
            return self.text(value)
        return value


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _load_json(path: Path):
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # JSON lines
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _first_difference(a, b, where: str = "") -> str:
    if type(a) is not type(b):
        return f"{where or '/'}: {a!r:.80} != {b!r:.80}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}/{key}: only in {'B' if key not in a else 'A'}"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{where}/{key}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where or '/'}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or '/'}: {a!r:.80} != {b!r:.80}"


def _text_difference(a: str, b: str) -> str:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines())):
        if x != y:
            return f"line {i + 1}: {x.strip()[:70]!r} != {y.strip()[:70]!r}"
    return f"{len(a.splitlines())} != {len(b.splitlines())} lines"


def _csv_difference(a: list[list[str]], b: list[list[str]]) -> str:
    if not a or not b or a[0] != b[0]:
        return f"header: {_first_difference(a[:1], b[:1])}"
    if len(a) != len(b):
        return f"{len(a) - 1} != {len(b) - 1} rows"
    for i, (ra, rb) in enumerate(zip(a, b)):
        for name, x, y in zip(a[0], ra, rb):
            if x != y:
                return f"row {i} ({ra[0]}) column {name}: {x} != {y}"
    return "rows differ in length"


def _png_delta(a: Path, b: Path) -> tuple[int, float]:
    """(largest channel difference 0..255, share of pixels that differ); (256, 1.0) if the sizes differ."""
    import numpy as np
    from PIL import Image

    with Image.open(a) as ia, Image.open(b) as ib:
        if ia.size != ib.size:
            return 256, 1.0
        pa = np.asarray(ia.convert("RGBA"), dtype=np.int16)
        pb = np.asarray(ib.convert("RGBA"), dtype=np.int16)
    delta = np.abs(pa - pb)
    return int(delta.max()), float((delta > 0).any(-1).mean())


class Tolerance:
    """Exact by default. rtol > 0: numbers (JSON numbers, numeric CSV cells) equal within a relative
    tolerance; png_delta > 0: plots equal if no channel of any pixel differs by more."""

    def __init__(self, rtol: float = 0.0, png_delta: int = 0):
        self.rtol, self.png_delta = rtol, png_delta

    def number(self, x, y) -> bool:
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
            return False
        if x != x and y != y:  # both NaN
            return True
        return abs(x - y) <= self.rtol * max(abs(x), abs(y))

    def cell(self, x: str, y: str) -> bool:
        try:
            return self.number(float(x), float(y))
        except ValueError:
            return False

    def equal(self, a, b) -> bool:
        if a == b:
            return True
        if not self.rtol:
            return False
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(self.equal(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(self.equal(x, y) for x, y in zip(a, b))
        if isinstance(a, str) and isinstance(b, str):
            return self.cell(a, b)
        return self.number(a, b)


def compare_file(rel: str, a: Path, b: Path, na: Normaliser, nb: Normaliser, ignored: set[str],
                 tol: Tolerance) -> tuple[str, str]:
    """(status, detail) for one file present in both runs."""
    suffix = a.suffix.lower()
    if rel == "manifest.json":
        ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
        codes = lambda m: [(r["model"], r["step"], r["returncode"]) for r in m["runs"]]  # noqa: E731
        if ma["inputs"] != mb["inputs"]:
            return "DIFF", f"input models differ (sha256), not the same starting point: {_first_difference(ma['inputs'], mb['inputs'])}"
        if codes(ma) != codes(mb):
            return "DIFF", f"exit codes: {_first_difference(codes(ma), codes(mb))}"
        return "same", "inputs and exit codes"
    if suffix in {".json", ".jsonl"}:
        ja, jb = na.json(_load_json(a), ignored), nb.json(_load_json(b), ignored)
        if ja == jb:
            return "same", ""
        return ("close", f"within rtol {tol.rtol:g}") if tol.equal(ja, jb) else ("DIFF", _first_difference(ja, jb))
    if suffix == ".csv":
        ra = [[na.text(c) for c in row] for row in csv.reader(io.StringIO(a.read_text()))]
        rb = [[nb.text(c) for c in row] for row in csv.reader(io.StringIO(b.read_text()))]
        for rows in (ra, rb):  # drop timing/version columns, named in the header
            if rows:
                drop = {i for i, name in enumerate(rows[0]) if IGNORED_KEYS.match(name)}
                ignored.update(rows[0][i] for i in drop)
                rows[:] = [[c for i, c in enumerate(row) if i not in drop] for row in rows]
        if ra == rb:
            return "same", ""
        return ("close", f"within rtol {tol.rtol:g}") if tol.equal(ra, rb) else ("DIFF", _csv_difference(ra, rb))
    if suffix == ".png":
        if a.read_bytes() == b.read_bytes():
            return "same", "bytes"
        delta, share = _png_delta(a, b)
        if delta == 0:
            return "same", "pixels (bytes differ)"
        detail = f"{share:.2%} of pixels differ, by up to {delta}/255" if delta <= 255 else "image sizes differ"
        return ("close" if delta <= tol.png_delta else "DIFF"), detail
    if suffix in {".md", ".yml", ".yaml", ".txt", ".stdout", ".stderr", ".py", ".jinja", ".log"} or a.name == "README":
        ta, tb = na.lines(a.read_text()), nb.lines(b.read_text())
        if ta == tb:
            return "same", ""
        return ("differs, not counted" if suffix == ".stderr" else "DIFF"), _text_difference(ta, tb)
    return ("same", "bytes") if _sha256(a) == _sha256(b) else ("DIFF", "bytes differ")


def compare(a: Path, b: Path, tol: Tolerance | None = None) -> int:
    tol = tol or Tolerance()
    na, nb = Normaliser(a), Normaliser(b)
    fa, fb = _files(a), _files(b)
    rows, ignored = [], set()
    for rel in sorted(fa | fb):
        stray = "/cwd/" in f"/{rel}"
        if rel not in fb:
            rows.append((rel, "ONLY IN A", "stray file written in the cwd" if stray else ""))
        elif rel not in fa:
            rows.append((rel, "ONLY IN B", "stray file written in the cwd" if stray else ""))
        else:
            status, detail = compare_file(rel, a / rel, b / rel, na, nb, ignored, tol)
            rows.append((rel, status, ("stray file in the cwd; " if stray else "") + detail))
    width = max(len(r[0]) for r in rows)
    print(f"{'file':{width}s}  status                 detail")
    for rel, status, detail in rows:
        print(f"{rel:{width}s}  {status:22s} {detail}")
    bad = [r for r in rows if r[1] in {"DIFF", "ONLY IN A", "ONLY IN B"}]
    close = [r for r in rows if r[1] == "close"]
    strays = sorted(r[0] for r in rows if "/cwd/" in f"/{r[0]}")
    print(f"\nignored JSON keys / CSV columns: {', '.join(sorted(ignored)) or 'none'}")
    print(f"stray files written in the cwd: {', '.join(strays) or 'none'}")
    print(f"{len(rows)} files, {len(bad)} difference(s)" + (f", {len(close)} equal within tolerance" if close else ""))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p_run = sub.add_parser("run", help="run the CLI on tiny models and write everything into OUT")
    p_run.add_argument("out", type=Path)
    p_run.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma list of tests/tiny.py model types")
    p_run.add_argument("--models", type=Path, help="folder of the tiny models (made there if missing; default: temporary)")
    p_run.add_argument("--expect-package", help="fail unless rys_forge is imported from under this folder")
    p_cmp = sub.add_parser("compare", help="compare two run folders; exit 1 on a difference")
    p_cmp.add_argument("a", type=Path)
    p_cmp.add_argument("b", type=Path)
    p_cmp.add_argument("--rtol", type=float, default=0.0,
                       help="relative tolerance for numbers in JSON/CSV (default 0: exact); matches show as 'close'")
    p_cmp.add_argument("--png-delta", type=int, default=0,
                       help="largest per-channel pixel difference (0-255) accepted in plots (default 0: exact)")
    args = parser.parse_args(argv)
    if args.mode == "run":
        archs = [a for a in args.archs.split(",") if a]
        unknown = [a for a in archs if a not in BUILD_WINDOW]
        if unknown:
            parser.error(f"no windows configured for {unknown}; known: {sorted(BUILD_WINDOW)}")
        return run(args.out, archs, args.models, args.expect_package)
    return compare(args.a, args.b, Tolerance(args.rtol, args.png_delta))


if __name__ == "__main__":
    sys.exit(main())
