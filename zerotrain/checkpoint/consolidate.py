"""One file from a sharded checkpoint (no process group needed), and the way back into a plain model.

``consolidate`` writes a safetensors state dict of full parameters keyed by the model's parameter
names, streaming one parameter at a time (host memory: the largest parameter). Tied aliases
(e.g. ``lm_head.weight`` sharing ``wte.weight``) are not duplicated: they are listed in the file's
metadata under ``zerotrain.aliases`` ({alias: name}) and :func:`load_consolidated_into` resolves
them; ``include_aliases=True`` writes them as copies too.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .collect import global_shape
from .format import dtype_of, read_manifest, resolve, verify_file
from .source import ParamSource
from .tensorfile import ShardReader, write_safetensors

ALIASES_KEY = "zerotrain.aliases"


def _entries(manifest: dict, source: ParamSource, dtype, include_aliases: bool):
    """(name, dtype, shape, producer) for every full tensor, in manifest order."""
    out = []
    for group, kind in (("params", "master"), ("extras", "extra")):
        for name, meta in manifest[group].items():
            saved = dtype_of(meta["dtype"])
            want = dtype if dtype is not None and saved.is_floating_point else saved
            shape = global_shape(meta["shape"], meta["tp"])
            out.append((name, want, shape,
                        lambda n=name, k=kind, g=group, w=want: source.read_global(n, k, group=g).to(w)))
    if include_aliases:
        by_name = {e[0]: e for e in out}
        out += [(alias, *by_name[target][1:]) for alias, target in manifest["aliases"].items()]
    return out


def full_state_dict(path_or_root, *, tag: str | None = None, dtype=torch.float32,
                    include_aliases: bool = True) -> dict[str, torch.Tensor]:
    """The full (unsharded, tp-merged) parameters and buffers of a checkpoint, in memory."""
    ckpt = resolve(path_or_root, tag)
    manifest = read_manifest(ckpt)
    with ShardReader(ckpt, manifest) as reader:
        entries = _entries(manifest, ParamSource(manifest, reader), dtype, include_aliases=False)
        sd = {name: get() for name, _, _, get in entries}
    if include_aliases:
        sd.update({alias: sd[target] for alias, target in manifest["aliases"].items()})
    return sd


def consolidate(path_or_root, out_file, *, tag: str | None = None, dtype=torch.float32,
                include_aliases: bool = False) -> Path:
    """Write one safetensors file of the full parameters (``dtype``, default fp32; None keeps the
    saved dtype) keyed by parameter name. Every shard file's sha256 is checked first."""
    ckpt = resolve(path_or_root, tag)
    manifest = read_manifest(ckpt)
    for name in manifest["files"]:
        verify_file(ckpt, name, manifest)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    metadata = {"format": "zerotrain-consolidated", ALIASES_KEY: json.dumps(manifest["aliases"]),
                "step": manifest["step"], "tag": manifest["tag"],
                "model": json.dumps(manifest.get("model"))}
    with ShardReader(ckpt, manifest, verify=False) as reader:
        entries = _entries(manifest, ParamSource(manifest, reader), dtype, include_aliases)
        write_safetensors(tmp, entries, metadata)
    os.replace(tmp, out)
    return out


def load_consolidated_into(model: torch.nn.Module, file, *, strict: bool = True) -> torch.nn.Module:
    """Copy a consolidated file into a plain (unsharded) model, resolving tied aliases."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"consolidated checkpoint {file} does not exist")
    targets = model.state_dict()
    with safe_open(str(file), framework="pt", device="cpu") as f:
        aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        keys = set(f.keys())
        missing = [k for k in targets if k not in keys and aliases.get(k) not in keys]
        unexpected = sorted(keys - set(targets))
        if strict and (missing or unexpected):
            raise ValueError(f"{file} does not match {type(model).__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; build the model with the saved configuration")
        with torch.no_grad():
            for name, t in targets.items():
                src_name = name if name in keys else aliases.get(name)
                if src_name not in keys:
                    continue
                src = f.get_tensor(src_name)
                if src.shape != t.shape:
                    raise ValueError(f"{file}: {name} has shape {tuple(src.shape)}, the model's is "
                                     f"{tuple(t.shape)}; build the model with the saved configuration")
                t.copy_(src)
    return model


# ------------------------------------------------------------------ HuggingFace GPT-2 names
_BLOCK = re.compile(r"blocks\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)")
_TOP = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
        "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias",
        "lm_head.weight": "lm_head.weight"}


def to_hf_gpt2_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a zerotrain GPT state dict to ``transformers.GPT2LMHeadModel``'s layout.

    HF's Conv1D stores linear weights as (in, out): ``c_attn``, ``c_proj``, ``c_fc`` weights are
    transposed. A tied ``lm_head.weight`` missing from ``sd`` is taken from ``wte.weight``; a model
    built with ``bias=False`` gets zero biases (the same function). Activation: HF ``gelu_new``.
    """
    if any(name.startswith("copy_head.") for name in sd):
        raise ValueError("to_hf_gpt2_state_dict: this model has a copy head (GPTConfig.copy_head, added by "
                         "fine-tuning), which GPT2LMHeadModel has no place for; export the pretrained run instead")
    out = {}
    for name, t in sd.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        m = _BLOCK.fullmatch(name)
        if m is None:
            raise ValueError(f"to_hf_gpt2_state_dict: {name!r} is not a zerotrain GPT parameter")
        layer, module, leaf = m.groups()
        conv = module != "ln_1" and module != "ln_2"
        out[f"transformer.h.{layer}.{module}.{leaf}"] = t.t().contiguous() if conv and leaf == "weight" else t
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    for name in [n for n in out if n.endswith(".weight") and n.startswith("transformer.")]:
        bias = name[:-len("weight")] + "bias"
        if bias not in out and not name.startswith(("transformer.wte", "transformer.wpe")):
            w = out[name]
            out[bias] = torch.zeros(w.shape[-1], dtype=w.dtype)
    return out
