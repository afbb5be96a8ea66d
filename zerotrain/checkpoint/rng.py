"""Random-number-generator state of one rank: byte tensors for torch (CPU, CUDA), JSON for Python
``random`` and NumPy."""
from __future__ import annotations

import random

import torch


def capture() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for the rank's safetensors file, JSON-able part for the manifest)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = state
    version, internal, gauss = random.getstate()
    info = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        info["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return tensors, info


def restore(tensors: dict[str, torch.Tensor], info: dict) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda")), key=lambda k: int(k[8:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "python" in info:
        version, internal, gauss = info["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in info:
        import numpy as np
        name, keys, pos, has_gauss, cached = info["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
