"""Tests of rys_forge.local_tasks: the offline lm-eval tasks shipped with rys-forge.

Only task construction and document rendering are exercised; no model is run. The loading tests run with
the offline variables set, network access blocked, an empty `datasets` cache and a working directory that
is not the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lm_eval")

from rys_forge.errors import TaskError, UsageError  # noqa: E402
from rys_forge.evaluate.local_tasks import (  # noqa: E402
    CACHE_DIR_ENV,
    DATA_DIR,
    LOCAL_TASK_NAMES,
    LOCAL_TASKS,
    SUITE_GROUP,
    TEMPLATE_DIR,
    local_task_dir,
    resolve_tasks,
    task_data_files,
    task_manager,
)
from rys_forge.evaluate.runner import offline_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# task -> (shipped data file, item count, upstream lm-eval task)
SHIPPED: dict[str, tuple[str, int, str]] = {
    "rys_arc_easy": ("arc_easy_test.jsonl", 2376, "arc_easy"),
    "rys_arc_challenge": ("arc_challenge_test.jsonl", 1172, "arc_challenge"),
    "rys_hellaswag": ("hellaswag_validation_1000.jsonl", 1000, "hellaswag"),
    "rys_piqa": ("piqa_validation.jsonl", 1838, "piqa"),
    "rys_openbookqa": ("openbookqa_validation.jsonl", 500, "openbookqa"),
    "rys_gsm8k": ("gsm8k_test.jsonl", 1319, "gsm8k"),
    "rys_gsm8k_ll": ("gsm8k_test.jsonl", 1319, "gsm8k"),  # rys-forge's own log-likelihood scoring of GSM8K
    "rys_lambada_openai": ("lambada_openai_test.jsonl", 5153, "lambada_openai"),
}
UPSTREAM_YAML = {
    "rys_arc_easy": "arc/arc_easy.yaml",
    "rys_arc_challenge": "arc/arc_challenge.yaml",
    "rys_hellaswag": "hellaswag/hellaswag.yaml",
    "rys_piqa": "piqa/piqa.yaml",
    "rys_openbookqa": "openbookqa/openbookqa.yaml",
    "rys_gsm8k": "gsm8k/gsm8k.yaml",
    "rys_lambada_openai": "lambada/lambada_openai.yaml",
}
SUITE_MEMBERS = [
    "rys_arc_easy",
    "rys_arc_challenge",
    "rys_hellaswag",
    "rys_piqa",
    "rys_openbookqa",
    "rys_lambada_openai",
]
# Keys a local template may set differently from its upstream YAML: naming and where the data comes from.
DATA_SOURCE_KEYS = {
    "task",
    "tag",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "process_docs",  # same function, in a copied module (checked separately)
}


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise OSError("network access attempted during an offline test")


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if limit is not None and len(rows) == limit:
                break
    return rows


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


def _render(task: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """Everything a zero-shot request is built from, for one document."""
    return {
        "text": task.doc_to_text(doc),
        "choices": task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None,
        "target": task.doc_to_target(doc),
        "context": task.fewshot_context(doc=doc, num_fewshot=0),
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def offline_world(tmp_path_factory: pytest.TempPathFactory):
    """Offline variables set, sockets blocked, empty datasets cache, cwd outside the repository."""
    import datasets
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("offline")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv(CACHE_DIR_ENV, str(root / "rys-cache"))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        # datasets / huggingface_hub read the variables once, at import (already done by lm_eval):
        # give their cached flags the values the variables produce.
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", root / "hf-datasets" / "downloads")
        mp.setattr(socket, "getaddrinfo", _no_network)
        mp.setattr(socket.socket, "connect", _no_network)
        assert not Path.cwd().resolve().is_relative_to(REPO)
        yield root


@pytest.fixture(scope="module")
def manager(offline_world: Path):
    """The full task manager: local tasks plus lm-eval's built-ins."""
    return task_manager()


@pytest.fixture(scope="module")
def loaded(manager) -> dict[str, Any]:
    """Every local task, loaded through the task manager."""
    return manager.load(list(LOCAL_TASK_NAMES))["tasks"]


# --------------------------------------------------------------------------- shipped files


def test_local_tasks_constant_matches_shipped_templates() -> None:
    names = set()
    for path in TEMPLATE_DIR.glob("*.yaml"):
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)  # noqa: S506
        names.add(cfg.get("group") or cfg.get("task"))
    assert names == set(LOCAL_TASKS)
    assert LOCAL_TASKS[-1] == SUITE_GROUP and set(LOCAL_TASK_NAMES) == set(SHIPPED)


def test_shipped_data_counts_size_and_docs() -> None:
    shipped = sorted(p.name for p in DATA_DIR.iterdir())
    assert shipped == sorted({name for name, _, _ in SHIPPED.values()})
    total = sum(p.stat().st_size for p in DATA_DIR.iterdir())
    assert total < 6_000_000
    data_md = (REPO / "docs" / "DATA.md").read_text(encoding="utf-8")
    for task, (file_name, count, _) in SHIPPED.items():
        assert _count_lines(DATA_DIR / file_name) == count, file_name
        assert file_name in data_md and task in data_md and f"{count:,}" in data_md


def test_hellaswag_utils_is_a_copy_of_upstream() -> None:
    import lm_eval

    upstream = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py"
    ours = (TEMPLATE_DIR / "hellaswag_utils.py").read_text(encoding="utf-8")
    code = "".join(line for line in ours.splitlines(keepends=True) if not line.startswith("# "))
    assert code == upstream.read_text(encoding="utf-8")


@pytest.mark.parametrize("task", sorted(UPSTREAM_YAML))
def test_template_matches_upstream_config(task: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    import lm_eval

    upstream_path = Path(lm_eval.__file__).parent / "tasks" / UPSTREAM_YAML[task]
    ours = load_yaml(TEMPLATE_DIR / f"{task}.yaml", resolve_func=False)
    theirs = load_yaml(upstream_path, resolve_func=False)
    keys = (set(ours) | set(theirs)) - DATA_SOURCE_KEYS
    assert {k: ours.get(k) for k in keys} == {k: theirs.get(k) for k in keys}
    assert ours["dataset_path"] == "json" and "tag" not in ours


# --------------------------------------------------------------------------- materialised folder


def test_local_task_dir_is_idempotent_and_race_safe(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        dirs = list(pool.map(lambda _: local_task_dir(cache_dir=tmp_path), range(16)))
    assert len(set(dirs)) == 1
    folder = dirs[0]
    assert sorted(p.name for p in (tmp_path / "lm_eval_tasks").iterdir()) == [folder.name]  # no leftovers
    assert local_task_dir(cache_dir=tmp_path) == folder
    wrapper = yaml.safe_load((folder / "rys_piqa.yaml").read_text(encoding="utf-8"))
    assert wrapper["include"] == str(TEMPLATE_DIR / "rys_piqa.yaml")
    assert wrapper["dataset_kwargs"]["data_files"] == {"validation": str(DATA_DIR / "piqa_validation.jsonl")}
    # A tampered folder is replaced by a good one.
    (folder / "rys_piqa.yaml").write_text("task: broken\n", encoding="utf-8")
    assert local_task_dir(cache_dir=tmp_path) == folder
    assert yaml.safe_load((folder / "rys_piqa.yaml").read_text(encoding="utf-8")) == wrapper


# --------------------------------------------------------------------------- loading


def test_local_tasks_load_offline_from_another_cwd(loaded: dict[str, Any], offline_world: Path) -> None:
    assert Path.cwd().resolve() == offline_world.resolve()
    assert sorted(loaded) == sorted(SHIPPED)
    for task, (file_name, count, _) in SHIPPED.items():
        obj = loaded[task]
        assert len(obj.eval_docs) == count == _count_lines(DATA_DIR / file_name), task
        assert obj.config.dataset_kwargs["data_files"] == {
            obj.config.test_split: str(DATA_DIR / file_name)
        }
    assert list((offline_world / "hf-datasets").iterdir()), "datasets cached into the redirected cache"


def _upstream_task(manager, upstream: str, records: list[dict[str, Any]], tmp: Path):
    """Build lm-eval's own task from its installed YAML, fed with ``records`` for every split it names."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(manager.task_index[upstream].yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    path = tmp / f"{upstream}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    split_keys = ("training_split", "validation_split", "test_split", "fewshot_split")
    splits = {cfg.get(key) for key in split_keys} - {None}
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path) for split in splits}},
    )
    return ConfigurableTask(config=cfg)


@pytest.mark.parametrize("task", sorted(UPSTREAM_YAML))
def test_first_docs_render_like_upstream(task: str, manager, loaded: dict[str, Any], tmp_path: Path) -> None:
    file_name, _, upstream = SHIPPED[task]
    raw = _read_jsonl(DATA_DIR / file_name, limit=3)
    reference = _upstream_task(manager, upstream, raw, tmp_path)
    ours = loaded[task]
    for i in range(len(raw)):
        assert _render(ours, ours.eval_docs[i]) == _render(reference, reference.eval_docs[i]), (task, i)


def test_first_arc_easy_item_by_hand(loaded: dict[str, Any]) -> None:
    task = loaded["rys_arc_easy"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
        "\nAnswer:"
    )
    assert task.doc_to_choice(doc) == [
        "Sunlight is the source of energy for nearly all ecosystems.",
        "Most ecosystems are found on land instead of in water.",
        "Carbon dioxide is more available than other gases.",
        "The producers in all ecosystems are plants.",
    ]
    assert task.doc_to_target(doc) == 0


def test_first_hellaswag_item_is_preprocessed(loaded: dict[str, Any]) -> None:
    task = loaded["rys_hellaswag"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == "High jump: A boy is running down a track. The boy"
    assert task.doc_to_choice(doc)[2] == "lifts his body above the height of a pole."
    assert task.doc_to_target(doc) == 2


def test_gsm8k_fewshot_never_shows_the_item_itself(loaded: dict[str, Any]) -> None:
    task = loaded["rys_gsm8k"]
    assert task.config.num_fewshot == 5
    task.set_fewshot_seed(1234)
    doc = task.eval_docs[0]
    context = task.fewshot_context(doc=doc, num_fewshot=5)
    assert context.count("Question:") == 6
    assert context.endswith(task.doc_to_text(doc)) and doc["answer"] not in context


def test_group_expands_to_members(manager) -> None:
    result = manager.load([SUITE_GROUP])
    assert result["group_map"] == {SUITE_GROUP: SUITE_MEMBERS}
    assert sorted(result["tasks"]) == sorted(SUITE_MEMBERS)
    assert [p.name for p in task_data_files(SUITE_GROUP, manager)] == [SHIPPED[t][0] for t in SUITE_MEMBERS]


# --------------------------------------------------------------------------- resolve_tasks


def test_resolve_tasks_accepts_local_and_registry_names(manager) -> None:
    got = resolve_tasks(["rys_piqa, hellaswag", "leaderboard", "rys_arc_*", "rys_piqa"], manager)
    assert got == ["rys_piqa", "hellaswag", "leaderboard", "rys_arc_challenge", "rys_arc_easy"]
    assert resolve_tasks("rys_suite", manager) == ["rys_suite"]


def test_unknown_task_is_a_one_line_task_error(manager) -> None:
    with pytest.raises(TaskError) as info:
        resolve_tasks(["rys_suite", "rys_hellaswog"], manager)
    message = str(info.value)
    assert isinstance(info.value, UsageError) and "\n" not in message
    assert "'rys_hellaswog'" in message and "lm-eval" in message and "rys_hellaswag?" in message
    assert all(name in message for name in LOCAL_TASKS)
    with pytest.raises(TaskError, match="no tasks given"):
        resolve_tasks([" ", ""], manager)


def test_missing_data_file_is_a_task_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    (data / "piqa_validation.jsonl").unlink()
    manager = task_manager(include_defaults=False, data_dir=data)
    assert resolve_tasks(["rys_arc_easy"], manager) == ["rys_arc_easy"]
    for request in (["rys_piqa"], ["rys_suite"]):
        with pytest.raises(TaskError) as info:
            resolve_tasks(request, manager)
        message = str(info.value)
        assert "\n" not in message and "'rys_piqa'" in message
        assert str(data / "piqa_validation.jsonl") in message


def test_include_path_is_added_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(TaskError, match="include path"):
        task_manager(tmp_path / "missing", include_defaults=False)
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "my_task.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: my_piqa
            dataset_path: json
            dataset_kwargs:
              data_files:
                validation: {DATA_DIR / 'piqa_validation.jsonl'}
            output_type: multiple_choice
            test_split: validation
            doc_to_text: "{{{{goal}}}}"
            doc_to_target: label
            doc_to_choice: "{{{{[sol1, sol2]}}}}"
            """
        ),
        encoding="utf-8",
    )
    manager = task_manager(user_dir, include_defaults=False)
    assert {"my_piqa", *LOCAL_TASKS} <= set(manager.all_tasks)
    assert "hellaswag" not in manager.all_tasks
    assert resolve_tasks(["my_piqa", "rys_piqa"], manager) == ["my_piqa", "rys_piqa"]


# --------------------------------------------------------------------------- offline_env


def test_offline_env_sets_only_unset_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's choice
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with offline_env() as added:
        assert added == {"HF_DATASETS_OFFLINE": "1"}
        assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True and hub_constants.HF_HUB_OFFLINE is False
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_DATASETS_OFFLINE" not in os.environ
    assert datasets.config.HF_HUB_OFFLINE is False

    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(RuntimeError), offline_env() as added:
        assert added == {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        assert hub_constants.HF_HUB_OFFLINE is True
        raise RuntimeError("restored on errors too")
    assert not {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"} & set(os.environ)
    assert hub_constants.HF_HUB_OFFLINE is False

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "")
    with offline_env() as added:
        assert added == {} and os.environ["HF_DATASETS_OFFLINE"] == ""


def test_fresh_interpreter_loads_offline(tmp_path: Path) -> None:
    """A new process (offline variables set before any import, sockets blocked) from a foreign cwd."""
    script = textwrap.dedent(
        """\
        import json, socket
        def no_network(*a, **k):
            raise OSError("network access attempted")
        socket.getaddrinfo = no_network
        socket.socket.connect = no_network
        from rys_forge.evaluate.local_tasks import task_manager
        tasks = task_manager(include_defaults=False).load(["rys_hellaswag", "rys_piqa"])["tasks"]
        print(json.dumps({name: len(task.eval_docs) for name, task in tasks.items()}))
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        CACHE_DIR_ENV: str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rys_hellaswag": 1000, "rys_piqa": 1838}


def test_gsm8k_ll_scores_the_final_number(loaded: dict[str, Any]) -> None:
    """rys_gsm8k_ll: the continuation is the number after '####' without thousands separators."""
    task = loaded["rys_gsm8k_ll"]
    raw = _read_jsonl(DATA_DIR / "gsm8k_test.jsonl", limit=50)
    for k, record in enumerate(raw):
        number = record["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        doc = task.eval_docs[k]
        assert task.doc_to_text(doc).endswith("\nAnswer: The answer is")
        assert task.doc_to_target(doc) == number and number.lstrip("-").replace(".", "").isdigit()
    assert task.config.output_type == "loglikelihood" and task.config.target_delimiter == " "
