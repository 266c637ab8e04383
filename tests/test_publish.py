"""Model cards and Hub publishing: a golden card for a tiny export, and uploads to a stub Hub on 127.0.0.1.

The stub answers the requests huggingface_hub sends for `publish` (whoami, repo info, tree listing, repo and
branch creation, YAML validation, preupload, NDJSON commit), records them, and keeps the committed files, so a
test can check that every file arrived byte for byte. It answers `uploadMode: regular` for every file, so the
client sends contents inline (base64) in the commit instead of going through LFS/xet storage.

Regenerate the golden card with `RYS_FORGE_UPDATE_GOLDEN=1 pytest tests/test_publish.py`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from rys_forge import artifacts
from rys_forge.artifacts import CARD_FILE, check_verified, file_hashes
from rys_forge.artifacts import VERIFICATION_FILE as REPORT
from rys_forge.errors import UsageError, VerificationError
from rys_forge.plan import LayerPlan
from rys_forge.publish import format_result, publish, render_card, write_card
from rys_forge.publish.hub import HubAuthError, PublishError, RepoExistsError
from rys_forge.publish.numbers import count_parameters
from rys_forge.publish.sections import HEATMAP_FILE
from rys_forge.surgery.builder import build

GOLDEN = Path(__file__).parent / "golden" / "model_card_llama_2-5.md"
TOKEN = "hf_test_token"
REPO = "rys-test/tiny-llama-rys-2-5"
BASE_ID = "rys-test/tiny-llama"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # content does not matter: it is copied, not decoded


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw_exports(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """Unverified tiny llama exports of window 2:5 in both formats (verification is stubbed below: the real
    one is covered by test_build_verify and takes half a minute on two cores)."""
    root = tmp_path_factory.mktemp("publish_exports")
    base = str(tiny_model_dirs["llama"])
    return {
        "layerlist": build(base, ["2:5"], root / "layerlist", verify=False).path,
        "mergekit": build(base, ["2:5"], root / "mergekit", format="mergekit", verify=False).path,
    }


METRICS = {
    "tokens": 374, "kl_mean": 0.0, "kl_max": 3.2e-8, "max_abs_diff": 9.5e-7, "logit_scale": 4.685,
    "top1_agreement": 1.0, "cache_max_abs_diff": 1.7e-6, "generate_cache_equals_no_cache": True,
    "generate_equals_in_memory": True, "long_prompt_tokens": 64, "export_weight_bytes": 310608,
    "base_weight_bytes": 310608, "bytes_ratio": 1.0, "seconds": 1.0,
}
THRESHOLDS = {"kl_mean": 1e-6, "kl_max": 1e-4, "max_abs_rel": 1e-4, "top1": 0.999, "cache_rel": 1e-4}


def mark_verified(folder: Path, **metrics) -> Path:
    """Write a passing verification.json with the folder's real file hashes (what `verify` writes)."""
    config = json.loads((folder / "config.json").read_text())
    report = {
        "passed": True, "format": config["rys"]["format"], "plan": config["rys"]["plan"],
        "metrics": {**METRICS, **metrics}, "thresholds": THRESHOLDS, "failures": [],
        "files": file_hashes(folder), "settings": {"base": BASE_ID, "dtype": "float32", "device": "cpu", "prompts": 6},
    }
    (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return folder


def make_export(raw: Path, dest: Path, *, hub_base: bool = True) -> Path:
    """A verified copy of `raw` with a deterministic `rys` block (fixed date, version and base)."""
    shutil.copytree(raw, dest)
    config = json.loads((dest / "config.json").read_text())
    config["rys"]["created"] = "2026-01-02T03:04:05+00:00"
    config["rys"]["rys_forge_version"] = "0.0.0-test"
    if hub_base:
        config["rys"]["base_model"] = BASE_ID
        config["rys"]["base_info"] = {"base_model": BASE_ID, "license": "apache-2.0"}
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return mark_verified(dest)


def eval_report(plan_order: list[int], p_piqa: float = 0.41) -> dict:
    """A synthetic `EvalReport.to_dict()`."""
    rows = [
        {"task": "rys_arc_easy", "metric": "acc", "filter": "none", "base": 0.25, "rys": 0.28, "delta": 0.03,
         "base_stderr": 0.0435, "rys_stderr": 0.0451, "test": "mcnemar_exact", "p_value": 0.3018, "n": 100,
         "higher_is_better": True, "is_group": False, "in_group": False, "b": 5, "c": 8},
        {"task": "rys_piqa", "metric": "acc_norm", "filter": "none", "base": 0.52, "rys": 0.5, "delta": -0.02,
         "base_stderr": 0.0502, "rys_stderr": 0.0503, "test": "mcnemar_exact", "p_value": p_piqa, "n": 100,
         "higher_is_better": True, "is_group": False, "in_group": False, "b": 7, "c": 5},
        {"task": "rys_lambada_openai", "metric": "perplexity", "filter": "none", "base": 812.5, "rys": 845.25,
         "delta": 32.75, "base_stderr": 95.1, "rys_stderr": 99.8, "test": "paired_bootstrap", "p_value": 0.512,
         "n": 100, "higher_is_better": False, "is_group": False, "in_group": False, "ci_low": -60.0, "ci_high": 120.0},
    ]
    settings = {
        "mode": "export", "base": BASE_ID, "rys": "export", "plan": {"layer_order": plan_order}, "limit": 100,
        "num_fewshot": None, "num_fewshot_effective": "0-shot", "dtype": "float32", "device": "cpu",
        "versions": {"rys_forge": "0.0.0-test", "lm_eval": "0.4.13"},
    }
    return {"rys_forge_eval": 1, "settings": settings, "timings": {}, "rows": rows, "notes": [], "items": {}}


def make_rank_run(root: Path) -> Path:
    """A synthetic `rys-forge rank` run folder (summary, table, score heatmap)."""
    root.mkdir()
    rows = []
    for rank, (i, j, score) in enumerate([(2, 5, 0.61), (1, 4, 0.55), (3, 6, 0.2), (0, 2, float("nan"))]):
        rows.append({
            "window": f"{i}:{j}", "i": i, "j": j, "width": j - i, "score": score, "class": "candidate" if rank < 2 else "unstable",
            "P": 0.9, "A": 0.8, "S": 0.95, "D": 0.9, "cka_plateau": 0.93, "delta_0": 0.21, "r_0": 0.74,
            "d_dec": 0.031, "d_kl": 0.0123, "jac_sv_1": 1.07, "rho": 0.44, "cos_phi": -0.12, "mmd2": 0.0042,
        })
    summary = {
        "model": {"source": BASE_ID, "base_model": BASE_ID}, "architecture": {"model_type": "llama", "num_layers": 6},
        "created": "2026-01-01T00:00:00+00:00", "prompts": {"count": 12, "tokens": 480},
    }
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "windows.json").write_text(json.dumps(rows))  # NaN as the rank writer leaves it
    (root / "heatmap_score.png").write_bytes(PNG)
    return root


@pytest.fixture
def export(raw_exports, tmp_path) -> Path:
    folder = make_export(raw_exports["layerlist"], tmp_path / "tiny-llama-rys-2-5")
    (folder / "eval.json").write_text(json.dumps(eval_report([0, 1, 2, 3, 4, 2, 3, 4, 5]), indent=2))
    return folder


@pytest.fixture
def rank_run(tmp_path) -> Path:
    return make_rank_run(tmp_path / "rank-run")


# --------------------------------------------------------------------------- card


def test_card_golden(export, rank_run, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setattr(artifacts, "VERSION", "0.0.0-test")
    path = write_card(export, rank_run, repo_id=REPO)
    text = path.read_text()
    assert path == export / CARD_FILE
    if os.environ.get("RYS_FORGE_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "card differs from tests/golden; rerun with RYS_FORGE_UPDATE_GOLDEN=1 if intended"
    check_verified(export)  # README.md does not disturb the verification hashes
    assert not (export / HEATMAP_FILE).exists()

    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == BASE_ID and data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"
    assert {"rys", "rys-forge", "layer-repeat", "custom_code"} <= set(data["tags"]) and "mergekit" not in data["tags"]
    body = card.text
    assert "`[0, 1, 2, 3, 4, 2, 3, 4, 5]`" in body and "layers i..j-1" in body and "`2:5` (layers 2..4)" in body
    assert "| mean KL(in-memory repeat ‖ export) per token |" in body
    assert "| rys_piqa | acc_norm ↑ | 0.5200 ± 0.0502 | 0.5000 ± 0.0503 | -0.0200 | 0.410 | McNemar | 100 |" in body
    assert "None of the 3 tested differences is statistically significant" in body
    assert f"![score over all windows i:j]({HEATMAP_FILE})" in body and "rank 1 of 3 scored windows" in body
    assert 'from_pretrained("rys-test/tiny-llama-rys-2-5", trust_remote_code=True)' in body
    assert "2026-01-02T03:04:05+00:00" in body and "0.0.0-test" in body
    assert str(export) not in text and str(rank_run) not in text  # no local paths in a public card
    # Rendering is deterministic.
    assert render_card(export, rank_run, repo_id=REPO).text == text


@pytest.mark.skipif(not os.environ.get("RYS_FORGE_ONLINE_TESTS"), reason="ModelCard.validate needs huggingface.co")
def test_card_validates_on_the_hub():
    from huggingface_hub import ModelCard, constants

    if constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is set")
    ModelCard(GOLDEN.read_text()).validate()


def test_card_parameter_counts_match_independent_references(raw_exports, tiny_model_dirs):
    """Unique = the base's stored parameters; effective = the mergekit copy's stored parameters (each visit
    materialised); both formats agree."""
    from safetensors import safe_open

    def stored(folder: Path) -> int:
        total = 0
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                total += sum(_prod(handle.get_slice(k).get_shape()) for k in handle.keys())
        return total

    plan = LayerPlan.from_windows(["2:5"], 6)
    layerlist = count_parameters(raw_exports["layerlist"], plan)
    mergekit = count_parameters(raw_exports["mergekit"], plan)  # per-visit storage guessed from the indices
    assert count_parameters(raw_exports["mergekit"], plan, per_visit=True) == mergekit
    assert layerlist.unique == mergekit.unique == stored(tiny_model_dirs["llama"])
    assert layerlist.effective == mergekit.effective == stored(raw_exports["mergekit"])
    assert layerlist.extra_layer_fraction == pytest.approx(3 / 6)


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def test_mergekit_card_embeds_recipe_without_local_paths(raw_exports, tiny_model_dirs, tmp_path):
    folder = make_export(raw_exports["mergekit"], tmp_path / "mk")
    text = render_card(folder, repo_id="rys-test/mk").text
    from huggingface_hub import ModelCard

    data = ModelCard(text).data.to_dict()
    assert {"mergekit", "merge", "rys"} <= set(data["tags"]) and "custom_code" not in data["tags"]
    assert 'from_pretrained("rys-test/mk")\n' in text and "trust_remote_code" not in text.split("## Verification")[0]
    assert "```yaml\n# rys-forge mergekit passthrough recipe" in text and "merge_method: passthrough" in text
    assert f'model: "{BASE_ID}"' in text and "layer_range: [2, 6]" in text
    assert str(tiny_model_dirs["llama"]) not in text


def test_card_local_base_gemma_licence_and_significance(raw_exports, tmp_path):
    folder = make_export(raw_exports["layerlist"], tmp_path / "local", hub_base=False)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gemma3_text"  # licence inference by family (the card only reads config.json)
    (folder / "config.json").write_text(json.dumps(config))
    mark_verified(folder)
    (folder / "eval.json").write_text(json.dumps(eval_report(config["rys"]["plan"]["layer_order"], p_piqa=0.004)))
    text = render_card(folder).text
    from huggingface_hub import ModelCard

    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data  # a local path is not a Hub id
    assert data["license"] == "gemma" and "ai.google.dev/gemma/terms" in text
    assert "a local model without a recorded Hub id" in text and str(tmp_path) not in text
    assert "1 of 3 tested differences have p < 0.05" in text and "Bonferroni threshold of 0.0167 keeps 1" in text
    assert 'from_pretrained("local", trust_remote_code=True)' in text


def test_card_reports_tampering_and_rejects_foreign_eval_or_rank(export, rank_run, tmp_path):
    (export / "tokenizer.json").write_text("{}")
    assert "**Not valid:**" in render_card(export).text
    (export / "eval.json").write_text(json.dumps(eval_report([0, 1, 2, 3, 4, 5])))
    with pytest.raises(UsageError, match="eval.json was made for the layer order"):
        render_card(export)
    (export / "eval.json").unlink()
    summary = json.loads((rank_run / "summary.json").read_text())
    summary["architecture"]["num_layers"] = 18
    (rank_run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UsageError, match="18 layers"):
        render_card(export, rank_run)
    with pytest.raises(UsageError, match="not a rank run folder"):
        render_card(export, tmp_path)


@pytest.mark.parametrize("report", [[1, 2], {"rows": 5}, {"rows": [1]}, {"settings": 5, "rows": []}])
def test_card_refuses_an_eval_report_of_the_wrong_shape_in_one_line(export, report):
    (export / "eval.json").write_text(json.dumps(report))
    try:
        with pytest.raises(UsageError, match="eval.json is not an evaluation report as rys-forge writes it"):
            render_card(export)
    finally:
        (export / "eval.json").unlink()


@pytest.mark.parametrize("file,content", [("summary.json", []), ("summary.json", {"architecture": 5}),
                                          ("summary.json", {"architecture": {"num_layers": "x"}}),
                                          ("windows.json", [1, 2])])
def test_card_refuses_a_rank_run_of_the_wrong_shape_in_one_line(export, rank_run, tmp_path, file, content):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(rank_run, run)
    (run / file).write_text(json.dumps(content))
    with pytest.raises(UsageError, match="is not a rank run folder as rys-forge writes it"):
        render_card(export, run)


# --------------------------------------------------------------------------- stub Hub


class StubHub:
    """A minimal Hugging Face Hub: enough of the API for `HfApi.upload_folder` and friends."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: set[str | None] = set()
        self.unhandled: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.preuploaded: list[str] = []
        self.corrupt: str | None = None  # a path whose stored content the stub alters
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _send(handler, status: int, payload, headers: dict | None = None):
        body = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(body)

    def handle(self, h, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.requests.append((method, path))
        if path != "/api/agent-harnesses":
            self.auth_headers.add(h.headers.get("Authorization"))
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if path != "/api/agent-harnesses" and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(h, 401, {"error": "Invalid credentials in Authorization header"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/.*)?", path)
        repo, rest = (m.group(1), m.group(2) or "") if m else (None, "")
        not_found = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        if method == "GET" and path == "/api/whoami-v2":
            return self._send(h, 200, {"type": "user", "name": "rys-test", "orgs": []})
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            name = f"{data['organization']}/{data['name']}"
            if name in self.repos:
                return self._send(h, 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{name}"})
            self.repos[name] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            return self._send(h, 200, {"url": f"{self.endpoint}/{name}", "name": name})
        if method == "GET" and path == "/api/agent-harnesses":
            return self._send(h, 200, {"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(h, 200, {"errors": [], "warnings": []})
        if repo is not None and repo not in self.repos:
            return self._send(h, 404, {"error": "Repository not found"}, not_found)
        if method == "GET" and (rest == "" or rest.startswith("/revision/")):
            siblings = [{"rfilename": p} for p in sorted(self.repos[repo])]
            return self._send(h, 200, {"id": repo, "sha": "0" * 40, "private": False, "siblings": siblings})
        if method == "GET" and rest.startswith("/tree/"):
            files = [
                {"type": "file", "path": p, "size": len(c),
                 "oid": hashlib.sha1(f"blob {len(c)}\0".encode() + c).hexdigest()}
                for p, c in sorted(self.repos[repo].items())
            ]
            return self._send(h, 200, files)
        if method == "POST" and rest.startswith("/branch/"):
            return self._send(h, 200, {})
        if method == "POST" and rest.startswith("/preupload/"):
            files = json.loads(body)["files"]
            self.preuploaded += [f["path"] for f in files]
            return self._send(h, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
            ]})
        if method == "POST" and rest.startswith("/commit/"):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            self.commits.append({"revision": rest.split("/", 2)[2], "lines": lines})
            for line in lines:
                if line["key"] == "file":
                    assert line["value"]["encoding"] == "base64"
                    content = base64.b64decode(line["value"]["content"])
                    if line["value"]["path"] == self.corrupt:
                        content += b"!"
                    self.repos[repo][line["value"]["path"]] = content
                elif line["key"] != "header":
                    self.unhandled.append(("commit line", line["key"]))
            oid = hashlib.sha1(body).hexdigest()
            return self._send(h, 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{repo}/commit/{oid}"})
        self.unhandled.append((method, path))
        return self._send(h, 404, {"error": f"stub hub: unhandled {method} {path}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stub Hub, with offline mode lifted for the test (conftest sets HF_HUB_OFFLINE=1, which blocks even
    localhost; huggingface_hub reads it into `constants` at import). `constants.ENDPOINT` points at the stub
    too, so that requests made outside `HfApi(endpoint=...)` (huggingface_hub's agent-harness registry fetch
    behind its coloured output) never leave the machine."""
    from huggingface_hub import constants

    stub = StubHub()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", stub.endpoint)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield stub
    stub.close()
    assert not stub.unhandled, f"requests the stub does not know: {stub.unhandled}"


def expected_upload(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and "__pycache__" not in p.parts}


# --------------------------------------------------------------------------- publish


def test_publish_uploads_every_file_and_never_shows_the_token(export, rank_run, hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    (export / "__pycache__").mkdir()
    (export / "__pycache__" / "modeling_rys.cpython-311.pyc").write_bytes(b"cache")
    (export / ".DS_Store").write_bytes(b"hidden")
    # Hidden files and caches are hashed by verification but never uploaded: re-mark after adding them.
    mark_verified(export)
    result = publish(export, REPO, token=TOKEN, endpoint=hub.endpoint, rank_run=rank_run, private=True)
    print(format_result(result))

    stored = hub.repos[REPO]
    expected = expected_upload(export)
    expected[HEATMAP_FILE] = PNG
    assert set(stored) - {".gitattributes"} == set(expected)
    for name, content in expected.items():
        assert stored[name] == content, name
    assert stored[CARD_FILE] == (export / CARD_FILE).read_bytes() == result.card_text.encode()
    assert "__pycache__/modeling_rys.cpython-311.pyc" not in stored and ".DS_Store" not in stored
    assert [name for name, _ in result.files] == sorted(expected)
    assert dict(result.files)["model.safetensors"] == (export / "model.safetensors").stat().st_size
    assert result.url == f"{hub.endpoint}/{REPO}" and result.commit_url.startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert not result.dry_run and not result.existed
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "main"
    assert sorted(hub.preuploaded) == sorted(expected)
    called = {(m, re.sub(r"/(main|tree/main)$", "", p)) for m, p in hub.requests}
    assert ("POST", "/api/repos/create") in called and ("GET", "/api/whoami-v2") in called
    assert hub.auth_headers == {f"Bearer {TOKEN}"}
    check_verified(export)  # the card written into the folder keeps it publishable
    print(sorted(set(hub.requests)))

    out, err = capsys.readouterr()
    assert TOKEN not in out + err + caplog.text and TOKEN not in repr(result)
    assert f"{hub.endpoint}/{REPO}" in out


def test_publish_dry_run_lists_files_and_sends_nothing(export, rank_run, hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = publish(export, REPO, dry_run=True, endpoint=hub.endpoint, rank_run=rank_run)
    expected = expected_upload(export)
    names = dict(result.files)
    assert set(names) == set(expected) | {CARD_FILE, HEATMAP_FILE}
    assert names[CARD_FILE] == len(result.card_text.encode()) and names[HEATMAP_FILE] == len(PNG)
    assert hub.requests == [] and not (export / CARD_FILE).exists()
    assert any("hf auth login" in note for note in result.notes)
    text = format_result(result)
    assert text.startswith(f"dry run: would upload {len(names)} files") and "model.safetensors" in text


def test_publish_into_existing_repo_needs_exist_ok(export, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token found by huggingface_hub.get_token()
    hub.repos[REPO] = {".gitattributes": b"", "old-shard.safetensors": b"old", "config.json": b"{}"}
    with pytest.raises(RepoExistsError, match=r"already exists .* 2 files \(config.json, old-shard.*--exist-ok") as info:
        publish(export, REPO, endpoint=hub.endpoint)
    assert "\n" not in str(info.value) and not hub.commits and not (export / CARD_FILE).exists()

    result = publish(export, REPO, endpoint=hub.endpoint, exist_ok=True, revision="rys-v1")
    assert result.existed and result.stale_remote_files == ["old-shard.safetensors"]
    assert result.url == f"{hub.endpoint}/{REPO}/tree/rys-v1" and hub.commits[0]["revision"] == "rys-v1"
    assert ("POST", f"/api/models/{REPO}/branch/rys-v1") in hub.requests
    assert hub.repos[REPO]["config.json"] == (export / "config.json").read_bytes()


def test_publish_into_existing_empty_repo(export, hub):
    hub.repos[REPO] = {".gitattributes": b""}  # created on the website beforehand
    result = publish(export, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert result.existed and not result.stale_remote_files and len(hub.commits) == 1


def test_publish_detects_a_corrupted_upload(export, hub):
    hub.corrupt = "config.json"
    with pytest.raises(PublishError, match="could not be confirmed: config.json"):
        publish(export, REPO, token=TOKEN, endpoint=hub.endpoint)


def test_publish_rejected_token_is_one_line(export, hub):
    with pytest.raises(HubAuthError, match=r"rejected the token .*hf auth login") as info:
        publish(export, REPO, token="hf_wrong_token", endpoint=hub.endpoint)
    assert "\n" not in str(info.value) and "hf_wrong_token" not in str(info.value)


def test_publish_unreachable_hub_is_one_line(export, hub):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(PublishError, match=f"could not check the token on {dead}") as info:
        publish(export, REPO, token=TOKEN, endpoint=dead)
    assert "\n" not in str(info.value) and TOKEN not in str(info.value)


def test_publish_missing_token(export, hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubAuthError) as info:
        publish(export, REPO, endpoint=hub.endpoint)
    message = str(info.value)
    assert "\n" not in message and "hf auth login" in message and "HF_TOKEN" in message
    assert hub.requests == [] and not (export / CARD_FILE).exists()


def test_publish_offline_mode_says_so(export, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what conftest sets for the session; nothing may be contacted
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE") as info:
        publish(export, REPO, token=TOKEN, endpoint="http://127.0.0.1:9")
    assert "\n" not in str(info.value)


def test_publish_refuses_unverified_and_tampered_folders(export, raw_exports, tmp_path, hub):
    with pytest.raises(VerificationError, match="no verification.json"):
        publish(raw_exports["layerlist"], REPO, token=TOKEN, endpoint=hub.endpoint)
    with (export / "model.safetensors").open("r+b") as handle:  # flip one byte of the weights
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(VerificationError, match=r"changed since verification \(model.safetensors\)"):
        publish(export, REPO, token=TOKEN, endpoint=hub.endpoint, dry_run=True)
    failed = make_export(raw_exports["layerlist"], tmp_path / "failed")
    report = json.loads((failed / REPORT).read_text())
    report.update(passed=False, failures=["mean KL 0.3 > 1e-06"])
    (failed / REPORT).write_text(json.dumps(report))
    with pytest.raises(VerificationError, match="failed verification: mean KL"):
        publish(failed, REPO, token=TOKEN, endpoint=hub.endpoint)
    assert hub.requests == []


def test_publish_rejects_bad_repo_id(export):
    with pytest.raises(UsageError, match="owner/name"):
        publish(export, "no-namespace", dry_run=True)


def test_cli_card_and_publish_dry_run(export, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from rys_forge.cli import main

    result = CliRunner().invoke(main, ["card", str(export)])
    assert result.exit_code == 0, result.output
    assert (export / "README.md").exists() and "wrote" in result.output
    result = CliRunner().invoke(main, ["publish", str(export), "--repo-id", "someone/tiny-rys", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output
    (export / "modeling_rys.py").write_text("# tampered\n")
    result = CliRunner().invoke(main, ["publish", str(export), "--repo-id", "someone/tiny-rys", "--dry-run"])
    assert result.exit_code == 1
    assert "changed since verification" in result.output.strip().splitlines()[-1]
