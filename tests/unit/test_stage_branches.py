"""No module outside the stage table branches on the ZeRO stage number.

``zerotrain/parallel/zero/policy.py`` is the one place where the stages differ; everything else
asks its ``StagePolicy`` a question (``shard_grads``, ``reduce``, ``gathers_per_step``, ...).
This reads every module's syntax tree and fails on a comparison with a stage number (``stage ==``,
``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in (...)``, ``not in``, on a name or attribute such as
``stage``, ``zs.stage``, ``zero_stage``, on either side), a ``match`` on one, or a second stage
table (``STAGE_FULL``). Reading the tree rather than the text keeps docstrings and messages
("stage 3 gathers ...") out of it.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "zerotrain"
TABLE = ROOT / "parallel" / "zero" / "policy.py"
SECOND_TABLES = {"STAGE_FULL"}
VALUE_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)  # not `is None`


def _is_stage(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    return isinstance(name, str) and (name == "stage" or name.endswith("_stage"))


def branches(source: str) -> list[tuple[int, str]]:
    """(line, code) of every comparison with, or match on, a stage number, and of any second
    stage table."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Compare) and any(isinstance(op, VALUE_OPS) for op in node.ops)
                and any(map(_is_stage, [node.left, *node.comparators]))):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Match) and _is_stage(node.subject):
            found.append((node.lineno, f"match {ast.unparse(node.subject)}"))
        elif isinstance(node, ast.Name) and node.id in SECOND_TABLES:
            found.append((node.lineno, node.id))
    return sorted(found)


def test_the_check_catches_each_form():
    code = ("if stage == 1: pass\nx = 2 if stage >= 2 else 3\ny = policy.stage != 0\n"
            "z = zs.stage in (2, 3)\nw = 3 < cfg.zero_stage\nv = STAGE_FULL[stage]\n"
            "match stage:\n    case 3: pass\n")
    assert [line for line, _ in branches(code)] == [1, 2, 3, 4, 5, 6, 7]
    clean = ('"""stage == 3 in a docstring"""\nmsg = f"stage {stage} >= 2"\n'
             "if policy.shard_grads: pass\nstages = sorted(STAGES)\nn = len(stages) > 1\n"
             "s = [args.stage] if args.stage is not None else []\n")
    assert branches(clean) == []


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if p != TABLE)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_branch_on_the_stage_number(path):
    found = branches(path.read_text())
    assert not found, (f"{path.relative_to(ROOT.parent)} branches on the ZeRO stage: "
                       + "; ".join(f"line {n}: {code}" for n, code in found)
                       + ". Ask the stage's policy (policy_for(stage)) instead")
