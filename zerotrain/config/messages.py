"""Pydantic validation errors turned into one line per problem, each naming the field, the value and the fix."""
from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import ValidationError

from zerotrain.config.blocks import OPTIMIZERS, SCHEDULERS, _Block
from zerotrain.config.schema import ZeroTrainConfig

_DEEPSPEED_ONLY = {"communication_data_type": " Use zerotrain.reduce_dtype.", "fp32_allreduce":
                   " Use zerotrain.reduce_dtype.", "amp": " Use bf16 or fp16.", **dict.fromkeys((
                       "flops_profiler", "tensorboard", "wandb", "csv_monitor",
                       "comms_logger", "pipeline", "prescale_gradients", "gradient_predivide_factor",
                       "zero_allow_untested_optimizer", "sparse_attention", "elasticity", "autotuning",
                       "data_efficiency"), "")}
_UNIONS = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "model_type": "an object {...}", "dict_type": "an object {...}",
             "tuple_type": "a list", "list_type": "a list"}
_BOUNDS = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
           "less_than": "< {lt}"}
_HINTS = {"gradient_clipping": " (0 turns clipping off)"}


def _dotted(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i == 1 and loc[0] in _UNIONS:
            continue                      # the union tag pydantic adds after optimizer / scheduler
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _block_at(loc: tuple) -> type[_Block] | None:
    cls: Any = ZeroTrainConfig
    if loc and loc[0] in _UNIONS:
        cls = next((c for c in _UNIONS[loc[0]] if len(loc) > 1 and c.TYPE == loc[1]), None)
        loc = loc[2:]
    for part in loc:
        cls = getattr(cls.model_fields.get(part) if cls else None, "annotation", None)
        if not (isinstance(cls, type) and issubclass(cls, _Block)):
            return None
    return cls


def _got(value: Any) -> str:
    hint = " ('auto' is a HuggingFace placeholder; write the number)" if value == "auto" else ""
    return f"got {json.dumps(value, default=repr)} ({type(value).__name__}){hint}"


def _unknown_key(loc: tuple) -> str:
    key, path = loc[-1], _dotted(loc)
    if len(loc) == 1 and key in _DEEPSPEED_ONLY:
        return f"{path}: a DeepSpeed option zerotrain does not support; remove it.{_DEEPSPEED_ONLY[key]}"
    block = _block_at(loc[:-1])
    valid = sorted(block.model_fields) if block else []
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown key; did you mean {close[0]!r}?"
    return f"{path}: unknown key; valid keys are: {', '.join(valid)}"


def _unknown_type(loc: tuple, value: Any) -> str:
    names = [c.TYPE for c in _UNIONS[loc[0]]]
    if not isinstance(value, dict):
        return f'{loc[0]}: expected an object {{"type": ..., "params": {{...}}}}, {_got(value)}'
    if not isinstance(value.get("type"), str):
        return f"{loc[0]}.type: required, a string, one of {', '.join(names)}"
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(value["type"].lower(), list(lower), n=1, cutoff=0.6)
    guess = f"did you mean {lower[close[0]]!r}? " if close else ""
    return f"{loc[0]}.type: unknown type {value['type']!r}; {guess}valid types are {', '.join(names)}"


def _describe(error: dict) -> list[str]:
    kind, loc, value = error["type"], tuple(error["loc"]), error.get("input")
    path = _dotted(loc)
    if kind == "extra_forbidden":
        return [_unknown_key(loc)]
    if kind in ("unknown_optimizer", "unknown_scheduler"):
        return [_unknown_type(loc, value)]
    if kind == "missing":
        return [f"{path}: required, not set"]
    if kind in _EXPECTED:
        return [f"{path}: expected {_EXPECTED[kind]}, {_got(value)}"]
    if kind in _BOUNDS:
        bound = _BOUNDS[kind].format(**error.get("ctx", {}))
        return [f"{path}: must be {bound}, {_got(value)}{_HINTS.get(path, '')}"]
    if kind == "literal_error":
        return [f"{path}: expected one of {error['ctx']['expected']}, {_got(value)}"]
    msg = error["msg"].removeprefix("Value error, ")
    return [f"{path}: {line}" if path else line for line in msg.splitlines()]


def format_validation_error(error: ValidationError, source: str) -> str:
    """One message for a pydantic error: a header, then one line per problem naming its field."""
    lines: list[str] = []
    for item in error.errors():
        lines.extend(line for line in _describe(item) if line not in lines)
    head = f"invalid zerotrain config ({source}): {len(lines)} problem{'s' * (len(lines) != 1)}"
    return "\n".join([head] + [f"  - {line}" for line in lines])
