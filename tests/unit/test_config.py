"""zerotrain.config: DeepSpeed-style JSON parsing, one-message errors, batch resolution, explain, CLI."""
import json
import logging
from pathlib import Path

import pytest
import torch

from zerotrain.config import ConfigError, cli_config, explain, load_config, parse_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.json"))
BASE = {"train_batch_size": 32}


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_examples_exist():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses_and_resolves(path):
    cfg = load_config(path)
    batch = cfg.resolve(2)
    assert batch.train_batch_size == batch.train_micro_batch_size_per_gpu * batch.gradient_accumulation_steps * 2
    explain(cfg, 2)


def test_example_contents():
    cfg = load_config(next(p for p in EXAMPLES if "zero2" in p.name))
    assert cfg.zero_optimization.stage == 2 and cfg.precision == "fp16" and cfg.fp16.loss_scale == 0
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000
    assert type(cfg.zero_optimization.reduce_bucket_size) is int
    assert cfg.scheduler.type == "WarmupLR" and cfg.scheduler.params.warmup_type == "linear"
    tp = load_config(next(p for p in EXAMPLES if "tp2" in p.name))
    assert tp.tensor_parallel.tp_size == 2 and tp.zerotrain.reduce_dtype == "fp32"


MALFORMED = [
    ({**BASE, "zero_optimization": {"stage": 2, "partitioned_activations": True}},
     ["zero_optimization.partitioned_activations: unknown key; valid keys are: allgather_bucket_size,"]),
    ({**BASE, "zero_optimization": {"stage": 2, "overlap_com": True}},
     ["zero_optimization.overlap_com: unknown key; did you mean 'overlap_comm'?"]),
    ({"train_batch_size": "32"}, ['train_batch_size: expected an integer, got "32" (str)']),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3},
     ["train_batch_size 32 is not a multiple of train_micro_batch_size_per_gpu 4 × "
      "gradient_accumulation_steps 3 = 12"]),
    ({**BASE, "fp16": {"enabled": True}, "bf16": {"enabled": True}},
     ["fp16.enabled and bf16.enabled are both true"]),
    ({**BASE, "zero_optimization": {"stage": 4}},
     ["zero_optimization.stage: stage 4 is not a ZeRO stage; valid stages are 0, 1, 2, 3"]),
    ({**BASE, "gradient_clipping": -1.0},
     ["gradient_clipping: must be >= 0.0, got -1.0 (float) (0 turns clipping off)"]),
    ({**BASE, "optimizer": {"type": "Adamm", "params": {"lr": 1e-3}}},
     ["optimizer.type: unknown type 'Adamm'; did you mean 'Adam'? valid types are Adam, AdamW, SGD"]),
    ({**BASE, "optimizer": {"type": "Lamb"}}, ["optimizer.type: unknown type 'Lamb'; valid types are"]),
    ({**BASE, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 100}}},
     ["scheduler.params.warmup_num_step: unknown key; did you mean 'warmup_num_steps'?"]),
    ({**BASE, "zero_optimization": 2}, ["zero_optimization: expected an object {...}, got 2 (int)"]),
    ({"train_micro_batch_size_per_gpu": 0}, ["train_micro_batch_size_per_gpu: must be >= 1, got 0 (int)"]),
    ({**BASE, "optimiser": {"type": "Adam"}}, ["optimiser: unknown key; did you mean 'optimizer'?"]),
    ({**BASE, "optimizer": {"type": "Adam", "params": {"lr": "1e-3"}}},
     ['optimizer.params.lr: expected a number, got "1e-3" (str)']),
    ({**BASE, "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.5]}}},
     ["optimizer.params.betas[1]: must be < 1.0, got 1.5 (float)"]),
    ({**BASE, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "nesterov": True}}},
     ["optimizer.params: nesterov needs momentum > 0 and dampening 0"]),
    ({**BASE, "optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}},
     ["optimizer.params.adam_w_mode: AdamW always decouples weight decay"]),
    ({**BASE, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50, "warmup_num_steps": 100}}},
     ["scheduler.params: total_num_steps 50 is less than warmup_num_steps 100"]),
    ({**BASE, "scheduler": {"type": "WarmupCosineLR"}}, ["scheduler.params: required, not set"]),
    ({**BASE, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": "exp"}}},
     ["scheduler.params.warmup_type: expected one of 'log' or 'linear', got \"exp\" (str)"]),
    ({**BASE, "fp16": {"enabled": "true"}}, ['fp16.enabled: expected true or false, got "true" (str)']),
    ({**BASE, "zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
     ["zero_optimization.offload_optimizer.device: offload to 'nvme' is not supported by zerotrain"]),
    ({**BASE, "zero_optimization": {"offload_param": {"device": "cpu"}}},
     ["zero_optimization.offload_param.device: parameter offload to 'cpu' is not supported by zerotrain"]),
    ({**BASE, "zero_optimization": {"reduce_bucket_size": 2.5}},
     ["zero_optimization.reduce_bucket_size: expected an integer, got 2.5 (float)"]),
    ({**BASE, "tensor_parallel": {"tp_size": 0}}, ["tensor_parallel.tp_size: must be >= 1, got 0 (int)"]),
    ({**BASE, "zerotrain": {"reduce_dtype": "fp64"}}, ["zerotrain.reduce_dtype: expected one of 'fp32', "]),
    ({"gradient_accumulation_steps": 4}, ["train_batch_size or train_micro_batch_size_per_gpu must be set"]),
    ({"train_batch_size": "auto"}, ["'auto' is a HuggingFace placeholder"]),
    ({**BASE, "communication_data_type": "fp32"},
     ["communication_data_type: a DeepSpeed option zerotrain does not support; remove it. Use zerotrain.reduce_dtype."]),
    ({**BASE, "optimizer": "adam"}, ['optimizer: expected an object {"type": ..., "params": {...}}, got "adam"']),
    ({**BASE, "activation_checkpointing": {"cpu_checkpointing": True}},
     ["activation_checkpointing.cpu_checkpointing: cpu_checkpointing=true is not supported by zerotrain"]),
    ({**BASE, "activation_checkpointing": {"partition_activation": True}},
     ["activation_checkpointing.partition_activation: unknown key; did you mean 'partition_activations'?"]),
]


@pytest.mark.parametrize("data,fragments", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_config_gives_one_message_naming_the_field(data, fragments):
    message = _error(data)
    lines = message.splitlines()
    assert lines[0] == "invalid zerotrain config (config dict): 1 problem", message
    assert len(lines) == 2 and lines[1].startswith("  - ")
    for fragment in fragments:
        assert fragment in message, message
    assert "pydantic" not in message and "validation error" not in message


def test_several_problems_each_on_their_own_line():
    message = _error({"train_batch_size": "32", "zero_optimization": {"stage": 4, "overlap_com": True},
                      "gradient_clipping": -1})
    lines = message.splitlines()
    assert lines[0].endswith("4 problems")
    assert [line.split(":")[0] for line in lines[1:]] == [
        "  - train_batch_size", "  - gradient_clipping", "  - zero_optimization.stage",
        "  - zero_optimization.overlap_com"]


@pytest.mark.parametrize("data,dp,expected,derived", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4), "gradient_accumulation_steps"),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 2, (32, 8, 2), "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 3, (24, 4, 2), "train_batch_size"),
    ({"train_batch_size": 32}, 4, (32, 8, 1), "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 4}, 3, (12, 4, 1), "train_batch_size"),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2,
     (24, 4, 3), None),
])
def test_batch_derivation(data, dp, expected, derived):
    batch = parse_config(data).resolve(dp)
    assert (batch.train_batch_size, batch.train_micro_batch_size_per_gpu,
            batch.gradient_accumulation_steps, batch.dp_size) == (*expected, dp)
    if derived is not None:
        assert derived in batch.derivation
    assert not set(data) & set(batch.derivation)


@pytest.mark.parametrize("data,dp,fragment", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2,
     "train_batch_size 32 != train_micro_batch_size_per_gpu 4 × gradient_accumulation_steps 2 × "
     "data-parallel size 2 = 16"),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 3,
     "train_batch_size 32 is not divisible by train_micro_batch_size_per_gpu 4 × data-parallel size 3 = 12"),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8}, 8,
     "train_batch_size 32 is not divisible by train_micro_batch_size_per_gpu 8 × data-parallel size 8 = 64"),
    ({"train_batch_size": 30}, 4,
     "train_batch_size 30 is not divisible by gradient_accumulation_steps 1 × data-parallel size 4 = 4"),
    ({"train_batch_size": 32}, 0, "data-parallel size must be a positive integer, got 0"),
])
def test_batch_resolution_errors_show_the_arithmetic(data, dp, fragment):
    cfg = parse_config(data)
    with pytest.raises(ConfigError, match="^" + fragment.replace("(", r"\(").replace(")", r"\)")):
        cfg.resolve(dp)


def test_inert_keys_listed_and_logged_once(caplog):
    data = {**BASE, "wall_clock_breakdown": True, "optimizer": {"type": "adam", "params": {"torch_adam": True}},
            "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_max_live_parameters": 1e9,
                                  "offload_param": {"device": "none"}},
            "fp16": {"enabled": False, "loss_scale_window": 500}}
    with caplog.at_level(logging.WARNING, logger="zerotrain"):
        cfg = load_config(data)
    expected = ["optimizer.params.torch_adam", "fp16.loss_scale_window", "zero_optimization.overlap_comm",
                "zero_optimization.stage3_max_live_parameters", "zero_optimization.offload_param.device",
                "wall_clock_breakdown"]
    assert cfg.inert_keys() == expected
    records = [r for r in caplog.records if r.name == "zerotrain"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert all(key in records[0].getMessage() for key in expected)
    assert parse_config({**BASE, "zero_optimization": {"stage": 2}}).inert_keys() == []


@pytest.mark.parametrize("optimizer,cls,kwargs", [
    ({"type": "Adam"}, torch.optim.AdamW,
     dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)),
    ({"type": "adam", "params": {"adam_w_mode": False, "lr": 0.01, "weight_decay": 0.1}}, torch.optim.Adam,
     dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False)),
    ({"type": "ADAMW", "params": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6}}, torch.optim.AdamW,
     dict(lr=3e-4, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0, amsgrad=False)),
    ({"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}, torch.optim.SGD,
     dict(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=True, dampening=0.0)),
])
def test_build_optimizer_spec(optimizer, cls, kwargs):
    cfg = parse_config({**BASE, "optimizer": optimizer})
    got_cls, got_kwargs = cfg.build_optimizer_spec()
    assert got_cls is cls and got_kwargs == kwargs
    got_cls([torch.nn.Parameter(torch.zeros(2))], **got_kwargs)   # torch accepts the kwargs
    assert cfg.optimizer.type in ("Adam", "AdamW", "SGD")


def test_no_optimizer_block():
    with pytest.raises(ConfigError, match="optimizer: not set"):
        parse_config(BASE).build_optimizer_spec()


def test_defaults_match_deepspeed():
    cfg = parse_config(BASE)
    fp16, zero = cfg.fp16, cfg.zero_optimization
    assert (fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window, fp16.hysteresis,
            fp16.min_loss_scale, fp16.consecutive_hysteresis) == (0.0, 16, 1000, 2, 1.0, False)
    assert (zero.stage, zero.reduce_bucket_size, zero.stage3_prefetch_bucket_size) == (0, 500_000_000, 50_000_000)
    assert (cfg.gradient_clipping, cfg.steps_per_print, cfg.precision, cfg.tensor_parallel.tp_size) == (0.0, 10, "fp32", 1)
    decay = parse_config({**BASE, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 5000}}})
    assert decay.scheduler.params.model_dump() == dict(
        warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000, warmup_type="log", total_num_steps=5000)
    cosine = parse_config({**BASE, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 5000}}})
    assert cosine.scheduler.params.model_dump() == dict(
        total_num_steps=5000, warmup_min_ratio=0.0, warmup_num_steps=1000, cos_min_ratio=0.0001, warmup_type="log")


def test_load_config_from_file_and_file_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    assert load_config(path).zero_optimization.stage == 2
    assert load_config(str(path)).train_batch_size == 8
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"train_batch_size": 8,\n "fp16": {enabled: true}}')
    with pytest.raises(ConfigError, match=f"{broken}: not valid JSON: .* at line 2 column 11"):
        load_config(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 7}}))
    with pytest.raises(ConfigError, match=f"invalid zerotrain config \\({bad}\\): 1 problem"):
        load_config(bad)
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        parse_config([1, 2])


def test_explain_marks_sources():
    cfg = parse_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
                        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
                        "zero_optimization": {"stage": 2, "overlap_comm": True}})
    rows = {line.split()[0]: line for line in explain(cfg, 2).splitlines()[3:]}
    assert rows["train_batch_size"].endswith("[user]")
    assert rows["gradient_accumulation_steps"].split()[1] == "4"
    assert rows["gradient_accumulation_steps"].endswith("[derived: 32 / (4 × 2)]")
    assert rows["optimizer.params.lr"].endswith("[user]") and rows["optimizer.params.eps"].endswith("[default]")
    assert rows["scheduler.params.warmup_max_lr"].split()[1] == "0.0003"
    assert rows["scheduler.params.warmup_max_lr"].endswith("[derived: optimizer.params.lr]")
    assert rows["zero_optimization.overlap_comm"].endswith("[user, inert]")
    assert rows["zero_optimization.reduce_bucket_size"].endswith("[default, inert]")
    assert rows["(precision)"].endswith("[derived]") and '"torch.optim.AdamW"' in rows["(torch"]
    bare = {line.split()[0]: line for line in explain(parse_config(BASE), 1).splitlines()[3:]}
    assert bare["optimizer"].endswith("[not set]") and bare["scheduler"].endswith("[not set]")
    assert bare["train_micro_batch_size_per_gpu"].endswith("[derived: 32 / (1 × 1)]")


def test_cli(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 1}}))
    assert cli_config(["explain", str(good), "--dp", "4"]) == 0
    out = capsys.readouterr().out
    assert "data-parallel size 4" in out and "[derived: 16 / (1 × 4)]" in out
    assert cli_config(["validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: valid"
    assert cli_config(["validate", str(good), "--dp", "3"]) == 2
    assert "not divisible" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 16, "bf16": {"enabled": True}, "fp16": {"enabled": True}}))
    assert cli_config(["explain", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "fp16.enabled and bf16.enabled are both true" in captured.err
    assert cli_config(["validate", str(tmp_path / "missing.json")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli_config(["frobnicate"]) == 2


def test_activation_checkpointing_block_turns_on_recompute_per_unit(caplog):
    import zerotrain
    from zerotrain.model import GPT, GPTConfig
    assert not parse_config(BASE).recompute_units
    cfg = {**BASE, "optimizer": {"type": "AdamW"},
           "activation_checkpointing": {"partition_activations": False, "number_checkpoints": 4}}
    assert parse_config(cfg).recompute_units
    with caplog.at_level(logging.WARNING, logger="zerotrain"):
        engine, *_ = zerotrain.initialize(model=GPT(GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2,
                                                              n_embd=8)), config=cfg)
    assert len(engine.module.zero_state.recomputed) == 2
    assert "activation_checkpointing.number_checkpoints" in caplog.text      # accepted, inert


def test_offload_optimizer_block_reaches_the_sharded_optimizer():
    import zerotrain
    from zerotrain.model import GPT, GPTConfig
    cfg = {**BASE, "optimizer": {"type": "AdamW"},
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    engine, opt, *_ = zerotrain.initialize(model=GPT(GPTConfig(vocab_size=17, block_size=8, n_layer=2,
                                                               n_head=2, n_embd=8)), config=cfg)
    assert opt.offload is not None and opt.offload.pin_memory
    assert all(u.host is not None for u in engine.module.zero_state.units)
