"""A training script written for DeepSpeed's API. The only change for zerotrain is the import.

    torchrun --nproc-per-node 2 examples/deepspeed_train.py --deepspeed_config ds_config.json

It trains a small HuggingFace GPT-2 (random weights, built offline) on random tokens and writes
each step's loss to --out (JSON) so tests can compare runs.
"""
import argparse
import json
import os

import torch
import zerotrain as deepspeed  # was: import deepspeed
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, SEQ, SAMPLES = 64, 16, 96


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self):
        self.data = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1234))

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def build_model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)

    deepspeed.init_distributed()
    model = build_model()
    engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=RandomTokens())
    losses = []
    batches = iter(loader)
    while engine.global_steps < args.steps:
        batch = {k: v.to(engine.device) for k, v in next(batches).items()}   # as DeepSpeed scripts do
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if args.out:
        with open(f"{args.out}.rank{engine.global_rank}", "w") as f:
            json.dump({"losses": losses, "lr": engine.get_lr(), "grad_norm": engine.get_global_grad_norm(),
                       "world": int(os.environ.get("WORLD_SIZE", 1))}, f)
    return losses


if __name__ == "__main__":
    main()
