"""A plain Accelerate training loop with GQC: three lines changed.

    python -m gqc_dist.examples.accelerate_loop
    accelerate launch --cpu --num_processes 2 -m gqc_dist.examples.accelerate_loop     # DDP on CPUs
    accelerate launch --num_processes 2 -m gqc_dist.examples.accelerate_loop           # DDP on 2 GPUs

A 2-layer Llama built from its config learns the same counting pattern as the Trainer example;
rank 0 prints one line per optimizer step with the micro-batches GQC took.
"""

import argparse

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from gqc_dist.examples.hf_trainer import dataset
from gqc_dist.frontends import accelerate as gqc_accelerate


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                                         max_position_embeddings=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / args.max_steps))
    loader = torch.utils.data.DataLoader(dataset(), batch_size=4, shuffle=True, collate_fn=collate)
    # was: model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model, optimizer, loader, scheduler, gqc = gqc_accelerate.prepare(
        accelerator, model, optimizer, loader, scheduler, gqc={"algorithm": "cbc", "kappa": 4.0, "max_draws": 8})
    steps = 0
    while steps < args.max_steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            if gqc.step():  # was: optimizer.step(); scheduler.step(); optimizer.zero_grad()
                scheduler.step()
                steps += 1
                window = gqc.decision.window
                accelerator.print(f"step {steps:3d}  micro-batches {window.num_draws}  lr {window.lr:.2e}  "
                                  f"loss {loss.item():.3f}")
                if steps == args.max_steps:
                    break
    return gqc


if __name__ == "__main__":
    main()
