"""Tests of the shipped prompt sets and of ``rys_forge.prompts``."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest

from rys_forge.errors import PromptError, UsageError
from rys_forge.rank.prompts import DEFAULT_FAMILIES, Prompt, available_families, load_prompts

ALLOWED_SOURCES = {"rys-forge (Apache-2.0)", "gsm8k-test (MIT)"}
CODE_LANGUAGES = {"python", "javascript", "c", "sql", "rust", "shell"}


def _raw_records(family: str) -> list[dict]:
    """Read a shipped JSONL file directly (bypassing the loader)."""
    text = resources.files("rys_forge.rank").joinpath("prompt_sets", f"{family}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- shipped sets


def test_available_families_are_the_default_families():
    assert available_families() == sorted(DEFAULT_FAMILIES)
    assert set(DEFAULT_FAMILIES) == {"math", "reasoning", "code", "multilingual", "prose"}
    assert isinstance(DEFAULT_FAMILIES, tuple)


@pytest.mark.parametrize("family", DEFAULT_FAMILIES)
def test_shipped_family_records_are_well_formed(family):
    records = _raw_records(family)
    assert len(records) >= 50
    for n, rec in enumerate(records, 1):
        assert {"id", "family", "text", "source"} <= rec.keys(), rec
        assert rec["family"] == family
        assert rec["id"] == f"{family}-{n:03d}"
        assert isinstance(rec["text"], str) and rec["text"].strip()
        assert rec["text"] == rec["text"].lstrip(), rec["id"]
        assert rec["source"] in ALLOWED_SOURCES, rec["id"]
        if rec["source"].startswith("gsm8k"):
            assert family == "math"
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts), "duplicate texts"


def test_shipped_sets_ids_and_texts_unique_across_families():
    prompts = load_prompts()
    ids = [p.id for p in prompts]
    assert len(set(ids)) == len(ids)
    normalised = [re.sub(r"\s+", " ", p.text.strip().lower()) for p in prompts]
    assert len(set(normalised)) == len(normalised)
    assert len(prompts) >= 300


def test_shipped_prompt_lengths_are_reasonable():
    # roughly 20-80 tokens: measured in characters so the test needs no tokenizer
    for prompt in load_prompts():
        assert 40 <= len(prompt.text) <= 400, (prompt.id, len(prompt.text))
        sentences = re.findall(r"[.!?。？！।؟]", prompt.text)
        assert len(sentences) <= 8, prompt.id


def test_gsm8k_share_is_bounded_and_marked():
    math = _raw_records("math")
    gsm = [r for r in math if r["source"] == "gsm8k-test (MIT)"]
    assert 0 < len(gsm) <= 40
    assert len(math) - len(gsm) >= 40  # most math prompts are written for the project


def test_multilingual_covers_many_languages_and_scripts():
    records = _raw_records("multilingual")
    langs = Counter(r["lang"] for r in records)
    assert len(langs) >= 8
    assert {"fr", "de", "es", "it", "pt", "zh", "ja", "ru", "ar", "hi"} <= set(langs)
    assert all(count >= 3 for count in langs.values())
    text = "".join(r["text"] for r in records)
    scripts = {
        "cyrillic": r"[\u0400-\u04FF]",
        "arabic": r"[\u0600-\u06FF]",
        "devanagari": r"[\u0900-\u097F]",
        "han": r"[\u4E00-\u9FFF]",
        "kana": r"[\u3040-\u30FF]",
        "hangul": r"[\uAC00-\uD7AF]",
    }
    for name, pattern in scripts.items():
        assert re.search(pattern, text), name
    # the first prompts already mix languages, so a small limit stays multilingual
    assert len({r["lang"] for r in records[:10]}) >= 8


def test_code_covers_the_required_languages_and_mixes_them_early():
    records = _raw_records("code")
    assert {r["subset"] for r in records} == CODE_LANGUAGES
    assert {r["subset"] for r in records[:6]} == CODE_LANGUAGES


# --------------------------------------------------------------------------- loading shipped sets


def test_load_all_default_order_is_concatenation_of_default_families():
    prompts = load_prompts()
    assert all(isinstance(p, Prompt) for p in prompts)
    order = list(dict.fromkeys(p.family for p in prompts))
    assert order == list(DEFAULT_FAMILIES)
    counts = Counter(p.family for p in prompts)
    for family in DEFAULT_FAMILIES:
        assert counts[family] == len(_raw_records(family))


def test_load_subset_in_requested_order_with_limit():
    prompts = load_prompts(["code", "math"], limit_per_family=5)
    assert [p.family for p in prompts] == ["code"] * 5 + ["math"] * 5
    assert [p.id for p in prompts[:2]] == ["code-001", "code-002"]
    assert prompts[5].id == "math-001"


def test_load_is_deterministic():
    a = load_prompts(limit_per_family=7)
    b = load_prompts(limit_per_family=7)
    assert a == b
    assert len(a) == 7 * len(DEFAULT_FAMILIES)
    assert load_prompts(["prose"]) == load_prompts(["prose"])


def test_single_string_and_duplicate_family_names():
    assert load_prompts("math", limit_per_family=3) == load_prompts(["math"], limit_per_family=3)
    assert load_prompts(["math", "math"], limit_per_family=3) == load_prompts(["math"], limit_per_family=3)


def test_limit_larger_than_family_returns_whole_family():
    assert len(load_prompts(["reasoning"], limit_per_family=10_000)) == len(_raw_records("reasoning"))


def test_prompt_is_frozen():
    prompt = load_prompts(["math"], limit_per_family=1)[0]
    with pytest.raises(AttributeError):
        prompt.text = "changed"  # type: ignore[misc]


# --------------------------------------------------------------------------- user files


def test_txt_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("  first prompt  \n\nsecond prompt\n   \nthird prompt", encoding="utf-8")
    prompts = load_prompts(path=path)
    assert prompts == [
        Prompt("mine-001", "mine", "first prompt"),
        Prompt("mine-002", "mine", "second prompt"),
        Prompt("mine-003", "mine", "third prompt"),
    ]
    assert load_prompts(path=str(path), limit_per_family=2) == prompts[:2]
    assert load_prompts(families=["mine"], path=path) == prompts


def test_jsonl_file(tmp_path):
    path = tmp_path / "custom.jsonl"
    lines = [
        {"text": "plain record"},
        {"prompt": "uses the prompt key", "family": "alt"},
        {"id": "x7", "family": "alt", "text": "explicit id", "extra": 1},
        {"text": "another plain one"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    prompts = load_prompts(path=path)
    assert prompts == [
        Prompt("custom-001", "custom", "plain record"),
        Prompt("alt-001", "alt", "uses the prompt key"),
        Prompt("x7", "alt", "explicit id"),
        Prompt("custom-002", "custom", "another plain one"),
    ]
    assert [p.id for p in load_prompts(path=path, limit_per_family=1)] == ["custom-001", "alt-001"]
    assert [p.id for p in load_prompts(["alt", "custom"], path=path)] == ["alt-001", "x7", "custom-001", "custom-002"]


def test_jsonl_keeps_text_verbatim(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"text": "def f():\n    return"}) + "\n", encoding="utf-8")
    assert load_prompts(path=path)[0].text == "def f():\n    return"


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffBonjour tout le monde\n".encode("utf-8"))
    assert load_prompts(path=path)[0].text == "Bonjour tout le monde"


# --------------------------------------------------------------------------- errors


def test_prompt_error_is_a_usage_error():
    assert issubclass(PromptError, UsageError)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.txt"
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    assert "nowhere.txt" in _one_line(exc)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PromptError) as exc:
        load_prompts(path=tmp_path)
    assert str(tmp_path) in _one_line(exc)


def test_unknown_extension(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    message = _one_line(exc)
    assert "prompts.csv" in message and ".csv" in message and ".txt" in message and ".jsonl" in message


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.txt", "\n   \n\n"), ("empty.jsonl", "\n\n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    message = _one_line(exc)
    assert name in message and "no prompts" in message


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    message = _one_line(exc)
    assert "bad.jsonl" in message and "line 3" in message and "JSON" in message


def test_jsonl_line_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["just", "a", "list"]\n', encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    assert "line 1" in _one_line(exc)


def test_jsonl_line_without_text(tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "wrong key"}\n', encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    message = _one_line(exc)
    assert "notext.jsonl" in message and "line 2" in message and "text" in message


@pytest.mark.parametrize("record", [{"text": ""}, {"text": "   "}, {"text": 42}, {"prompt": None}])
def test_jsonl_empty_or_non_string_text(tmp_path, record):
    path = tmp_path / "emptytext.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    assert "line 1" in _one_line(exc)


def test_jsonl_duplicate_id(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n', encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    message = _one_line(exc)
    assert "'a'" in message and "line 2" in message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError) as exc:
        load_prompts(path=path)
    assert "latin1.txt" in _one_line(exc)


def test_unknown_shipped_family_lists_known_ones():
    with pytest.raises(PromptError) as exc:
        load_prompts(["math", "poetry"])
    message = _one_line(exc)
    assert "'poetry'" in message
    for family in DEFAULT_FAMILIES:
        assert family in message


def test_unknown_family_in_user_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("hello there\n", encoding="utf-8")
    with pytest.raises(PromptError) as exc:
        load_prompts(["math"], path=path)
    message = _one_line(exc)
    assert "'math'" in message and "mine" in message


def test_empty_family_list():
    with pytest.raises(PromptError) as exc:
        load_prompts([])
    assert "no prompt families" in _one_line(exc)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "5"])
def test_bad_limit(limit):
    with pytest.raises(PromptError) as exc:
        load_prompts(limit_per_family=limit)
    message = _one_line(exc)
    assert "limit_per_family" in message and repr(limit) in message
