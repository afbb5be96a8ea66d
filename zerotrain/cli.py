"""``zerotrain <command>``: each command lives with the part it drives; this file only routes."""
from __future__ import annotations

import importlib
import sys

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


def _usage() -> str:
    lines = ["usage: zerotrain <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "zerotrain <command> --help shows a command's options."]
    return "\n".join(lines)


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
        print(f"zerotrain: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
