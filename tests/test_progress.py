"""Progress output: plain lines (done/total, rate, ETA) when stderr is not a terminal, a rich bar on a
terminal, nothing with progress off; and rank's window loop through it."""

from __future__ import annotations

import io
import re

import pytest

from rys_forge import progress
from rys_forge.models import load_model
from rys_forge.progress import PlainProgress, progress_bar
from rys_forge.rank import Prompt, RankSettings, rank_windows


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_with_rate_and_eta():
    stream, clock = io.StringIO(), FakeClock()
    plain = PlainProgress(stream, total=10, completed=2, label="probing windows", interval=5.0, clock=clock)
    for step in range(4):  # 2 s an item: a line once 5 s have passed since the last one
        clock.now += 2.0
        plain.advance()
    clock.now += 2.0
    plain.advance()
    plain.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[rys-forge] probing windows: 2/10 (20%), elapsed 0s",
        # 6 s in, 3 items this session (the 2 resumed ones do not count for the rate): 0.5/s, 5 left -> 10 s
        "[rys-forge] probing windows: 5/10 (50%), 0.50/s, elapsed 6s, eta 10s",
        "[rys-forge] probing windows: 7/10 (70%), 0.50/s, elapsed 10s, eta 6s",
    ]
    clock.now += 3600.0
    plain.done = 10
    assert plain.line() == "[rys-forge] probing windows: 10/10 (100%), 0.00/s, elapsed 1h00m10s"


def test_progress_bar_writes_plain_lines_off_a_terminal_and_nothing_when_disabled(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    stream = io.StringIO()
    with progress_bar(True, 3, 0, "evaluating windows", stream=stream) as advance:
        for _ in range(3):
            advance()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("[rys-forge] evaluating windows: 0/3 (0%)")
    assert re.fullmatch(r"\[rys-forge\] evaluating windows: 3/3 \(100%\), [0-9.]+/s, elapsed \d+s", lines[-1])

    quiet = io.StringIO()
    with progress_bar(False, 3, 0, "evaluating windows", stream=quiet) as advance:
        advance()
    assert quiet.getvalue() == ""


def test_progress_bar_on_a_terminal_is_a_rich_bar():
    terminal = Terminal()
    with progress_bar(True, 2, 0, "probing windows", stream=terminal) as advance:
        advance()
        advance()
    text = terminal.getvalue()
    assert "probing windows" in text and "2/2" in text and "[rys-forge]" not in text


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]))


def test_rank_prints_plain_progress_to_a_non_terminal_stderr(llama, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # a line per window
    prompts = [Prompt(f"p{k}", "a", text) for k, text in enumerate(["One two three four five.", "Six seven eight nine."])]
    settings = RankSettings(windows=["1:3", "2:4", "3:5"], max_tokens=10, jacobian="none", top_k=2)
    rank_windows(llama.model, llama.tokenizer, prompts, settings, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[rys-forge] probing windows")]
    assert [line.split(":")[1].split()[0] for line in lines] == ["0/3", "1/3", "2/3", "3/3"]
    assert "eta" in lines[1] and "/s" in lines[1]
    rank_windows(llama.model, llama.tokenizer, prompts, settings, progress=False)
    assert "[rys-forge]" not in capsys.readouterr().err
