"""The scaffolding of the `rys-forge` command line: one-line error mapping (`RysForgeGroup`, `exit_for`),
the shared options, early output checks and the printing helpers. `rys_forge.cli` holds the commands."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from rys_forge.plan import WINDOW_CONVENTION
from rys_forge.errors import (
    OutputError,
    RysForgeError,
    Terminated,
    os_error_errno,
    os_error_message,
    output_problem,
    redact,
)

MODEL_HELP = "Model: built-in name (gemma-3-270m, smollm2-135m, qwen2.5-coder-1.5b), local folder, .gguf file or hub id."

#: Library warnings that are not the user's business: transformers' notices about its own keyword
#: renames, raised from inside transformers' calls. Matched by message (from its start); rys-forge's own
#: warnings are never filtered.
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`past_key_values` is deprecated and will be removed in version [\w.]+ for `[\w.]+`\. Use `cache` instead"),
    (FutureWarning, r"Both `past_key_values` and `cache` are set for `[\w.]+`"),
)

#: Termination signals raised as `Terminated` in the main thread, so every cleanup written for Ctrl-C
#: (temporary folders, kept windows) runs for them too.
def _fail(message: str, code: int) -> NoReturn:
    """Print `rys-forge: error: MESSAGE` as one line (credentials redacted) and exit with `code`."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    click.echo(f"rys-forge: error: {redact(text)}", err=True)
    sys.exit(code)


def _forget_interrupt() -> None:
    """Make the exit code we choose stick after a handled Ctrl-C.

    CPython (3.11+) remembers a KeyboardInterrupt that escaped an `exec()` of source text (dataclasses and
    namedtuples build their methods that way, so imports are full of them) and, at exit, kills the process
    with SIGINT instead of using our exit code. A successful `exec()` of text clears that flag.
    """
    exec("pass", {})  # noqa: S102 - a constant, see above


def exit_for(exc: BaseException) -> NoReturn:
    """The one mapping from an exception that escaped a command to one stderr line and an exit code."""
    if isinstance(exc, KeyboardInterrupt):
        _forget_interrupt()
    if isinstance(exc, Terminated):
        _fail(f"terminated ({signal.Signals(exc.signum).name})", 128 + exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        _fail("interrupted", 130)
    if isinstance(exc, RysForgeError):
        _fail(str(exc), exc.exit_code)
    if isinstance(exc, OSError) or os_error_errno(exc) is not None:
        _fail(os_error_message(exc), 1)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        _fail("out of memory; try a smaller --batch-size, --dtype bfloat16, or another --device", 1)
    if os.environ.get("RYS_FORGE_DEBUG"):
        raise exc
    first = (str(exc).strip().splitlines() or [""])[0]
    _fail(f"unexpected {type(exc).__name__}: {first} (set RYS_FORGE_DEBUG=1 for the traceback)", 1)


def _click_line(exc: click.ClickException) -> str:
    """A click usage error as one line, pointing at the command's help."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see '{ctx.command_path} -h')" if ctx is not None else message


@contextlib.contextmanager
def _interrupts_not_swallowed() -> Iterator[None]:
    """A Ctrl-C (or SIGTERM) that lands while Python runs a `__del__` or a weakref callback is "unraisable":
    Python prints "Exception ignored in ..." with a traceback and carries on, so the command would finish as if
    never interrupted. While active, such an interrupt is delivered to the main thread again, without the
    printout, a moment later from a timer thread (`_thread.interrupt_main`): tripped from the hook itself it
    would land in the hook, inside the same finaliser. Other unraisables go to the previous hook."""
    import _thread
    import threading

    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if not isinstance(exc, KeyboardInterrupt):
            previous(unraisable)
            return
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        timer = threading.Timer(0.01, _thread.interrupt_main, args=(signum,))
        timer.daemon = True
        timer.start()

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def _command_environment() -> Iterator[None]:
    """Known library warnings silenced, termination signals raised as `Terminated` and interrupts that land
    in a finaliser delivered again, for one command; all restored afterwards (in-process callers such as
    tests keep their own)."""
    from rys_forge.files import signals_raise

    with warnings.catch_warnings(), signals_raise(Terminated, only_default=False), _interrupts_not_swallowed():
        for category, message in LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


class RysForgeGroup(click.Group):
    """The `rys-forge` group: the one place where everything a command does is guarded.

    From option parsing through the lazy imports to the work, an exception that escapes becomes one stderr
    line and an exit code (`exit_for`); click's usage errors become one line too. Known library warnings are
    silenced, SIGTERM/SIGHUP arrive as `Terminated` and an interrupt that lands in a finaliser is not lost
    (`_command_environment`).
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            with _command_environment():
                try:
                    value = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                except click.ClickException as exc:
                    if not standalone_mode:
                        raise
                    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                        exc.show()  # bare `rys-forge`: the help text, as click prints it
                        sys.exit(exc.exit_code)
                    _fail(_click_line(exc), exc.exit_code)
                except (click.Abort, KeyboardInterrupt, EOFError) as exc:  # Ctrl-C while click parses
                    if not standalone_mode:
                        raise
                    exit_for(exc.__context__ if isinstance(exc.__context__, KeyboardInterrupt) else KeyboardInterrupt())
        except KeyboardInterrupt as exc:  # while the environment itself is set up or torn down (its imports)
            if not standalone_mode:
                raise
            exit_for(exc)  # a Terminated keeps its signal's exit code
        if not standalone_mode:
            return value
        sys.exit(value if isinstance(value, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # stdout closed (`| head`): click quiets the pipe
                raise
            exit_for(exc)
        except (Exception, KeyboardInterrupt) as exc:
            exit_for(exc)


@contextlib.contextmanager
def resumable(command: str, out: str) -> Iterator[None]:
    """A run folder's command (`rank`, `sweep`): Ctrl-C, SIGTERM or a file-system error (a full disk) keep
    the finished windows; the one line says how to continue."""
    from rys_forge.artifacts import RUN_FILE

    try:
        yield
    except RysForgeError:
        raise  # its message is final
    except (Exception, KeyboardInterrupt) as exc:
        is_file_error = not isinstance(exc, KeyboardInterrupt) and os_error_errno(exc) is not None
        if not (Path(out) / RUN_FILE).is_file() or not (is_file_error or isinstance(exc, KeyboardInterrupt)):
            raise
        hint = f"finished windows are kept; continue with: rys-forge {command} ... --resume --out {out}"
        if is_file_error:
            _fail(f"{os_error_message(exc)}; {hint}", 1)
        code = 128 + exc.signum if isinstance(exc, Terminated) else 130
        _fail(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}; {hint}", code)


def output_check(folder: bool, existing_only: bool = False) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """Callback of an output option or argument: a location that could not be written is refused while the
    options are parsed, before any work (`errors.output_problem`), not after a long build or evaluation.

    Args:
        folder: the value is a folder to create or write into (else a file).
        existing_only: check only a folder that exists (a FOLDER argument the command writes into; a
            missing one gets the command's own message).
    """

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or (existing_only and not Path(value).expanduser().is_dir()):
            return value
        problem = output_problem(value, folder=folder)
        if problem is not None:
            name = param.opts[0] if param.param_type_name == "option" else (param.name or "").upper()
            raise OutputError(f"cannot write {name} {value}: {problem}")
        return value

    return check


def at_least_two(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """--repeats of a command that builds or evaluates a repeat: 1 visit is the base model itself."""
    if value < 2:
        raise click.BadParameter(f"{value} visit{'s' if value != 1 else ''} of the block is no repeat (the base model"
                                 " itself); use 2 or more")
    return value


class _DefaultModelOption(click.Option):
    """--model, whose default (`models.DEFAULT_MODEL`) is looked up only when needed: importing the CLI must
    not import torch, so that a Ctrl-C during the slow imports reaches `RysForgeGroup`'s guard."""

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        from rys_forge.models import DEFAULT_MODEL

        return DEFAULT_MODEL


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model, --dtype, --device, shared by every command that loads a model."""
    func = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")(func)
    func = click.option(
        "--dtype", default="float32", show_default=True, help="Weights dtype: float32, bfloat16 or float16."
    )(func)
    func = click.option("--model", "-m", "model_name", cls=_DefaultModelOption, show_default=True, help=MODEL_HELP)(func)
    return func


def placement_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--device-map, --max-memory, --offload-folder (accelerate big-model placement), handed to the
    command as one `placement` dict of `load_model` keywords."""

    @functools.wraps(func)
    def wrapper(*args: Any, device_map: str | None, max_memory: str | None, offload_folder: str | None, **kwargs: Any) -> Any:
        from rys_forge.models import placement

        return func(*args, placement=placement(device_map, max_memory, offload_folder), **kwargs)

    wrapper = click.option("--offload-folder", default=None, type=click.Path(), help="With --device-map: where weights mapped to disk go.")(wrapper)
    wrapper = click.option("--max-memory", default=None, help="With --device-map: budgets per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")(wrapper)
    return click.option(
        "--device-map", default=None,
        help="Spread a model too big for one device over the GPUs (and CPU/disk) with accelerate: auto, balanced, "
        "balanced_low_0 or sequential. Replaces --device.",
    )(wrapper)


def adapter_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--adapter, for the commands that load a base model."""
    return click.option(
        "--adapter", default=None,
        help="PEFT adapter (folder or hub id) loaded on the base and merged in (merge_and_unload) first; recorded in the outputs.",
    )(func)


def quiet_libraries() -> None:
    """rys-forge shows its own progress; silence transformers' per-load bars and advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def print_verification(report: dict) -> None:
    m = report["metrics"]
    click.echo(
        f"verification {'PASSED' if report['passed'] else 'FAILED'} ({report['format']}, {m['tokens']} tokens): "
        f"KL mean {m['kl_mean']:.2e} max {m['kl_max']:.2e}, max|dlogit| {m['max_abs_diff']:.2e}, "
        f"top-1 {m['top1_agreement']:.4f}, cache gap {m['cache_max_abs_diff']:.2e}, "
        f"generate cache==no-cache {m['generate_cache_equals_no_cache']}, bytes ratio {m['bytes_ratio']:.3f}"
    )
    if "gguf_tensor_mismatches" in m:
        click.echo(f"GGUF: {int(m['gguf_tensor_mismatches'])} tensors and {int(m['gguf_metadata_mismatches'])} metadata"
                   " values differ from the base's (remapped through the plan)")
    if "llamacpp_kl_mean" in m:
        floor = (f" = {m['llamacpp_kl_ratio']:.2f}x its quantisation floor on the base ({m['llamacpp_floor_kl_mean']:.3g})"
                 if "llamacpp_kl_ratio" in m else f", max {m['llamacpp_kl_max']:.3g}")
        click.echo(f"llama.cpp: mean KL to the in-memory repeat {m['llamacpp_kl_mean']:.3g}{floor}; greedy tokens equal"
                   f" {m['llamacpp_greedy_match']:.1f} of {m['llamacpp_greedy_tokens']:.0f}")
    elif "llamacpp" in m:
        click.echo(f"llama.cpp: {m['llamacpp']}")


def run_setup(command: str, model_name: str, out: str | None, device: str, resume: bool) -> tuple[Any, str, str]:
    """Shard, run folder and device of a `rank` / `sweep` process. Under torchrun (WORLD_SIZE > 1) the
    process group is initialised and each process gets its device; the run folder must then be given,
    since every process writes into the same one, as it must with `--resume` (the folder to continue).
    Default folder: runs/<command>-<model>-<time>."""
    import datetime
    import re

    from rys_forge.distributed import init_from_environment
    from rys_forge.errors import UsageError

    if out is None and resume:
        raise UsageError("--resume needs --out DIR (the run folder to continue)")
    if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"a window-parallel {command} (torchrun) needs --out: one run folder shared by all processes")
    shard, device = init_from_environment(device)  # under torchrun: one process per device, windows split
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_name).name or model_name).strip("-")
        out = str(Path("runs") / f"{command}-{slug}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    return shard, out, device


def check_windows(windows: tuple[str, ...]) -> None:
    """Parse i:j windows before any (slow) model load, so a typo fails fast with one line."""
    from rys_forge.plan import Window

    for window in windows:
        Window.parse(window)


def split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def print_top(result, top_k: int) -> None:
    """rank's short list as a table, titled by the score that ordered it (summary.json: ordering)."""
    from rich.console import Console
    from rich.table import Table

    ordering = result.summary.get("ordering") or {}
    learned = ordering.get("ordering_score") == "learned"
    by = f"learned score ({ordering.get('file') or 'in memory'})" if learned else "Score(B)"
    alpha = (result.summary.get("settings") or {}).get("alpha", 1.0)
    damped = f", repeated visits at alpha {alpha:g}" if alpha != 1 else ""
    table = Table(title=f"short list: top {top_k} windows by {by}, distinct regions (i:j = layers i..j-1){damped}")
    columns = [("window", "window"), ("raw rank", "rank"), *([("learned", "learned_score")] if learned else []),
               ("score", "score"), ("class", "class"), ("CKA(x_i,x_j)", "cka_plateau"),
               ("delta_0", "delta_0"), ("r_0", "r_0"), ("D_dec", "d_dec"), ("D_KL", "d_kl"), ("sigma_1(J)", "jac_sv_1")]
    for title, _ in columns:
        table.add_column(title, justify="right")
    for row in result.top(top_k):
        table.add_row(*[_fmt(row.get(key)) for _, key in columns])
    Console(width=max(120, Console().width)).print(table)


def print_learned(report: Any) -> None:
    """learn-score's report: per held-out model the prior, in-sample and out-of-model figures, the verdict,
    the largest weights and the files written."""
    click.echo(report.format_text())
    weights = list(report.surrogate.weights().items())[:8]
    click.echo("largest weights of the fit on every model (per sd): " + ", ".join(f"{k} {v:+.3f}" for k, v in weights))
    for path in report.saved_to:
        click.echo(f"wrote {path}")
    if not report.ship:
        click.echo("note: the verdict says do not ship; use the learned score to compare, not as a default")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value)


def short_type(layer_type: str) -> str:
    return "F" if layer_type.startswith("full") else "S" if layer_type.startswith("sliding") else layer_type


def print_model_facts(model_name: str, loaded: Any, facts: dict[str, Any], plan: Any) -> None:
    """`info`'s report: architecture, layers, attention types, parameters, window notation and the plan."""
    click.echo(f"model        {model_name}  ({loaded.path})")
    if loaded.info.get("adapter"):
        from rys_forge.adapters import describe_adapter

        click.echo(f"adapter      {describe_adapter(loaded.info['adapter'])}, merged")
    click.echo(f"architecture {facts['architecture']} (model_type={facts['model_type']})")
    click.echo(
        f"layers       {facts['num_layers']}  hidden={facts['hidden_size']}  heads={facts['num_attention_heads']}"
        f"/{facts['num_key_value_heads']} kv  vocab={facts['vocab_size']}"
    )
    click.echo(f"parameters   {facts['parameters']:,} ({facts['parameters_per_layer']:,} per layer)  dtype={facts['dtype']}")
    click.echo("attention    " + " ".join(f"{k}:{short_type(t)}" for k, t in enumerate(facts["layer_types"])))
    if facts.get("sliding_window"):
        click.echo(f"             S = sliding window of {facts['sliding_window']} tokens, F = full attention")
    n = facts["num_layers"]
    click.echo(f"windows      {WINDOW_CONVENTION.replace('L', str(n))}; e.g. --window {n // 3}:{n // 3 + max(2, n // 5)}")
    click.echo(f"             {n * (n - 1) // 2} windows of width >= 2")
    if plan is not None:
        click.echo(f"plan         {plan.describe()}")
        click.echo(f"order        {list(plan.order)}")
