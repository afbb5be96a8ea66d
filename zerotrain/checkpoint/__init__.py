"""Sharded, atomic, pickle-free checkpoints: safetensors shards per rank plus a JSON manifest,
loadable at any ZeRO stage, data-parallel size and tensor-parallel degree; consolidation to one
file. See :mod:`zerotrain.checkpoint.format` for the layout on disk."""
from .consolidate import consolidate, full_state_dict, load_consolidated_into, to_hf_gpt2_state_dict
from .format import latest_tag
from .load import load
from .save import save

__all__ = ["save", "load", "latest_tag", "consolidate", "full_state_dict", "load_consolidated_into",
           "to_hf_gpt2_state_dict", "cli_checkpoint"]


def cli_checkpoint(argv=None) -> int:
    from .cli import cli_checkpoint as run
    return run(argv)
