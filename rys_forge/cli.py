"""`rys-forge` command line: one thin command per pipeline stage.

Each command parses and validates its options, calls one library function and prints. Library errors
(`RysForgeError`) become one line on stderr with exit code 2 (usage) or 1 (failure); set
`RYS_FORGE_DEBUG=1` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import RysForgeError
from .plan import WINDOW_CONVENTION

MODEL_HELP = "Model: built-in name (gemma-3-270m, smollm2-135m), local folder, .gguf file or hub id."


def _fail(message: str, code: int) -> None:
    click.echo(f"rys-forge: error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map library errors to one stderr line and an exit code; never show a traceback for them."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RysForgeError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # an unexpected bug: still one line unless debugging
            if os.environ.get("RYS_FORGE_DEBUG"):
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"unexpected {type(exc).__name__}: {first} (set RYS_FORGE_DEBUG=1 for the traceback)", 1)

    return wrapper


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model, --dtype, --device, shared by every command that loads a model."""
    from .models import DEFAULT_MODEL

    func = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")(func)
    func = click.option(
        "--dtype", default="float32", show_default=True, help="Weights dtype: float32, bfloat16 or float16."
    )(func)
    func = click.option("--model", "-m", "model_name", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rys-forge")
def main() -> None:
    """rys-forge: find, build, verify, evaluate and publish RYS layer-repeat models.

    Pipeline: info -> rank (probe every window) -> build (export a window) -> verify -> eval -> publish.
    Windows are Python slices over decoder layers: i:j means layers i..j-1 (0-based, half-open).
    """
    _quiet_libraries()


def _quiet_libraries() -> None:
    """rys-forge shows its own progress; silence transformers' per-load bars and advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@main.command()
@model_options
@click.option("--window", "windows", multiple=True, help=f"Show the plan for a window ({WINDOW_CONVENTION}).")
@click.option("--repeats", default=2, show_default=True, type=int, help="Visits of each window's block.")
@handle_errors
def info(model_name: str, dtype: str, device: str, windows: tuple[str, ...], repeats: int) -> None:
    """Print architecture, layer count, attention type per layer, parameters and window notation."""
    from .models import describe_model, load_model
    from .plan import LayerPlan

    plan = None
    if windows:  # parse before the (slow) model load so typos fail fast
        from .plan import Window

        [Window.parse(w) for w in windows]
    loaded = load_model(model_name, dtype=dtype, device=device)
    facts = describe_model(loaded.model)
    if windows:
        plan = LayerPlan.from_windows(windows, facts["num_layers"], repeats)
    click.echo(f"model        {model_name}  ({loaded.path})")
    click.echo(f"architecture {facts['architecture']} (model_type={facts['model_type']})")
    click.echo(
        f"layers       {facts['num_layers']}  hidden={facts['hidden_size']}  heads={facts['num_attention_heads']}"
        f"/{facts['num_key_value_heads']} kv  vocab={facts['vocab_size']}"
    )
    click.echo(f"parameters   {facts['parameters']:,} ({facts['parameters_per_layer']:,} per layer)  dtype={facts['dtype']}")
    click.echo("attention    " + " ".join(f"{k}:{_short_type(t)}" for k, t in enumerate(facts["layer_types"])))
    if facts.get("sliding_window"):
        click.echo(f"             S = sliding window of {facts['sliding_window']} tokens, F = full attention")
    n = facts["num_layers"]
    click.echo(f"windows      {WINDOW_CONVENTION.replace('L', str(n))}; e.g. --window {n // 3}:{n // 3 + max(2, n // 5)}")
    click.echo(f"             {n * (n - 1) // 2} windows of width >= 2")
    if plan is not None:
        click.echo(f"plan         {plan.describe()}")
        click.echo(f"order        {list(plan.order)}")


def _short_type(layer_type: str) -> str:
    return "F" if layer_type.startswith("full") else "S" if layer_type.startswith("sliding") else layer_type


if __name__ == "__main__":  # pragma: no cover
    main()
