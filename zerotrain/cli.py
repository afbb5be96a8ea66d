"""``zerotrain <command>``: each command lives with the part it drives; this file only routes.

Every command's errors end here as one line, ``zerotrain <command>: error: <problem and fix>``,
with an exit status that says what kind of problem it was (``EXIT_CODES``); ``--verbose``
anywhere on the command line also prints the traceback. Command-line syntax errors are usage
errors too (one line, status 2).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from contextlib import contextmanager

COMMANDS = {
    "train": ("zerotrain.train.cli", "cli_train", "train a GPT on the bundled corpus (the main job)"),
    "eval": ("zerotrain.train.tasks_cli", "cli_eval", "held-out perplexity and cloze accuracy of a run; "
             "--task qa|summarize"),
    "generate": ("zerotrain.train.cli", "cli_generate", "sample text from a run's checkpoint"),
    "finetune": ("zerotrain.train.tasks_cli", "cli_finetune", "fine-tune a run on question answering and "
                 "summarization"),
    "ask": ("zerotrain.train.answer_cli", "cli_ask", "answer questions with a (fine-tuned) run"),
    "summarize": ("zerotrain.train.answer_cli", "cli_summarize", "summarize documents with a fine-tuned run"),
    "config": ("zerotrain.config", "cli_config", "explain or validate a DeepSpeed-style JSON config"),
    "estimate": ("zerotrain.planner", "cli_estimate", "memory and communication per rank, what fits"),
    "checkpoint": ("zerotrain.checkpoint.cli", "cli_checkpoint", "inspect or consolidate a checkpoint"),
}
# commands whose own parser takes --verbose (for debug logging); the others never see the flag
TAKES_VERBOSE = {"train", "eval", "generate"}
# flags whose values must be counts >= 1, checked here for parsers that accept any int
COUNT_FLAGS = {"estimate": ("--dp", "--tp", "--micro-batch", "--seq-len", "--layers", "--hidden", "--heads",
                            "--vocab")}

# Exit status by the error's class (the first match along its MRO, by name: no heavy imports).
EXIT_CODES = {
    "KeyboardInterrupt": 130,
    "UsageError": 2, "ConfigError": 2, "ValueError": 2,        # bad input: options, configs, files' contents
    "CheckpointError": 3,                                       # a checkpoint that is damaged or does not fit
    "TrainingDiverged": 4,                                      # non-finite losses or gradients
    "DistributedError": 5,                                      # a rank failed, ranks diverged
    "OSError": 6,                                               # missing file, permission, disk full
}
EXIT_UNEXPECTED = 1                                             # anything else: a bug


def _usage() -> str:
    lines = ["usage: zerotrain <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "zerotrain <command> --help shows a command's options; --verbose adds tracebacks to errors."]
    return "\n".join(lines)


class _ArgumentError(ValueError):
    """A command-line syntax error (argparse's), reported as a usage error."""


@contextmanager
def _one_line_argparse(command: str):
    """argparse errors raise instead of printing the usage block and exiting."""
    original = argparse.ArgumentParser.error

    def error(parser, message):
        raise _ArgumentError(f"{message} (see `zerotrain {command} --help`)")
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def exit_code(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return EXIT_UNEXPECTED


def one_line(message: str) -> str:
    """A message on one line: "header:\n  - a\n  - b" becomes "header: a; b"."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    head = " ".join(line for line in lines if not line.startswith("- "))
    items = "; ".join(line[2:] for line in lines if line.startswith("- "))
    if not items:
        return head
    return f"{head.rstrip(':')}: {items}" if head else items


def report(command: str, exc: BaseException, *, verbose: bool) -> int:
    """Print ``exc`` as one line (after its traceback when ``verbose``); return the exit status."""
    code = exit_code(exc)
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
        if getattr(exc, "details", ""):
            print(f"--- the failing rank's traceback:\n{exc.details}", file=sys.stderr)
    if code == 130:
        print(f"zerotrain {command}: interrupted", file=sys.stderr)
        return code
    text = one_line(str(exc)) or type(exc).__name__
    if code == EXIT_UNEXPECTED:
        text = f"{type(exc).__name__}: {text} (unexpected; rerun with --verbose for the traceback)"
    print(f"zerotrain {command}: error: {text}", file=sys.stderr)
    return code


def _check_text(argv: list[str]) -> None:
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise _ArgumentError(f"argument {shown!r} is not valid UTF-8 text; pass UTF-8 (check the "
                                 "terminal's or the script's encoding)") from None


def _check_counts(command: str, argv: list[str]) -> None:
    flags = COUNT_FLAGS.get(command, ())
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag not in flags:
            continue
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        try:
            ok = int(value) >= 1
        except ValueError:
            continue                               # argparse names what is not a number
        if not ok:
            raise _ArgumentError(f"argument {flag}: {value} is not a count >= 1 (see `zerotrain {command} --help`)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"zerotrain: error: unknown command '{name}'{hint} (`zerotrain --help` lists the commands)",
              file=sys.stderr)
        return 2
    verbose = "--verbose" in rest
    if verbose and name not in TAKES_VERBOSE:
        rest = [a for a in rest if a != "--verbose"]
    module, func, _ = COMMANDS[name]
    try:
        _check_text(rest)
        _check_counts(name, rest)
        with _one_line_argparse(name):
            return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except SystemExit as e:                    # --help, or a command that exits by itself
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BrokenPipeError as exc:             # `zerotrain ... | head`: the reader has had enough
        if _stdout_closed():
            return 0
        return report(name, exc, verbose=verbose)
    except BaseException as exc:  # noqa: BLE001 - every error becomes one line and an exit status
        return report(name, exc, verbose=verbose)


def _stdout_closed() -> bool:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
