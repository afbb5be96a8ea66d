"""Typed zerotrain configuration: the common subset of DeepSpeed's ``ds_config.json`` plus two
zerotrain blocks (``tensor_parallel``, ``zerotrain``).

Parsing rejects unknown keys (naming the closest valid one), wrong types (no "32" -> 32) and
contradictions, and reports every problem in one :class:`ConfigError`, one line per field. The
batch triple is resolved by :meth:`ZeroTrainConfig.resolve` once the data-parallel size is known.
Keys accepted for compatibility that change nothing are listed by ``inert_keys()``.

Optimizer choice: as in DeepSpeed, ``"Adam"`` has ``adam_w_mode`` true by default and then is
AdamW (decoupled weight decay); ``"Adam"`` with ``adam_w_mode: false`` is torch's L2-style Adam.

Layout: ``errors`` (ConfigError), ``blocks`` (nested blocks and field types), ``schema``
(ZeroTrainConfig, batch resolution), ``messages`` (pydantic errors as one line per field),
``loading`` (parse/load), ``report`` (explain and the ``zerotrain config`` CLI).
"""
from zerotrain.config.blocks import (OPTIMIZERS, SCHEDULERS, AdamParams, AdamWParams, BF16Config, Beta, Bool,
                                     Count, FP16Config, LrValue, NonNeg, NonNegInt, OffloadConfig,
                                     OptimizerConfig, PosInt, Ratio, SchedulerConfig, SGDParams,
                                     TensorParallelConfig, WarmupCosineLRParams, WarmupDecayLRParams,
                                     WarmupLRParams, WarmupType, ZeroConfig, ZeroTrainExtras)
from zerotrain.config.errors import ConfigError
from zerotrain.config.report import cli_config, explain
from zerotrain.config.loading import load_config, logger, parse_config, parse_scheduler
from zerotrain.config.messages import format_validation_error
from zerotrain.config.schema import BATCH_KEYS, ResolvedBatch, ZeroTrainConfig

__all__ = [
    "AdamParams", "AdamWParams", "BATCH_KEYS", "BF16Config", "Beta", "Bool", "ConfigError", "Count", "FP16Config",
    "LrValue", "NonNeg", "NonNegInt", "OPTIMIZERS", "OffloadConfig", "OptimizerConfig", "PosInt", "Ratio",
    "ResolvedBatch", "SCHEDULERS", "SGDParams", "SchedulerConfig", "TensorParallelConfig", "WarmupCosineLRParams",
    "WarmupDecayLRParams", "WarmupLRParams", "WarmupType", "ZeroConfig", "ZeroTrainConfig", "ZeroTrainExtras",
    "cli_config", "explain", "format_validation_error", "load_config", "logger", "parse_config", "parse_scheduler",
]
