"""The GPT model family: configuration and presets, the model, and generation."""
from zerotrain.model.config import PRESETS, GPTConfig, get_config
from zerotrain.model.generate import KVCache, generate
from zerotrain.model.gpt import GPT

__all__ = ["GPTConfig", "GPT", "PRESETS", "get_config", "generate", "KVCache"]
