"""A Hugging Face ``Trainer`` script that a ``gqc-train sweep`` runs as its own training job.

A spec runs it with a ``command`` template (the sweep fills in the placeholders)::

    {"base_lr": 0.003, "seeds": [0, 1],
     "command": ["{python}", "-m", "gqc_dist.examples.hf_sweep", "--out", "{out}",
                 "--seed", "{seed}", "--lr", "{lr}", "--gqc", "{gqc}"],
     "arms": [{"fixed": [1, 2], "lr": [0.5, 1, 2]},
              {"name": "cbc", "gqc": {"algorithm": "cbc", "kappa": 0.25, "max_draws": 4}, "lr": "k1"}]}

``{lr}`` is the rate the arm steps at (``base_lr * multiplier * sqrt(k)`` for fixed k, the
section's ``lr_coupling`` is ``none``), ``{gqc}`` the arm's section (``null``: :data:`GQC` here).
A 2-layer Llama built from its config (nothing is downloaded) learns a noisy counting pattern on
the CPU in a few seconds; a :class:`transformers.TrainerCallback` hands the GQC wrapper to a
:class:`gqc_dist.sweep.RunRecorder` after every optimizer step, and the final loss on held-out
sequences goes into ``{out}/sweep_result.json``. ``{out}/log_history.json`` keeps the Trainer's
own per-step logs (``learning_rate`` as applied, ``gqc/last_num_draws``, ``gqc/noise_scale...``).
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from gqc_dist.frontends.hf import GQCTrainer  # noqa: E402
from gqc_dist.sweep import RunRecorder  # noqa: E402

GQC = {"algorithm": "cbc", "kappa": 0.25, "max_draws": 8}  # the section when the sweep passes null
VOCAB, SEQ, BATCH = 32, 16, 4


def dataset(count, seed):
    """Sequences that count up modulo ``VOCAB`` from a random start, 10% of tokens replaced by noise."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    ids = (start + torch.arange(SEQ)) % VOCAB
    noise = torch.rand(count, SEQ, generator=generator) < 0.1
    ids = torch.where(noise, torch.randint(0, VOCAB, (count, SEQ), generator=generator), ids)
    return [{"input_ids": row, "labels": row} for row in ids]


class Record(TrainerCallback):
    """After every optimizer step (GQCTrainer calls ``on_step_end`` only then): the window the
    wrapper just stepped on and the noise scale it measured."""

    def __init__(self, recorder):
        self.recorder, self.trainer = recorder, None

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.observe(self.trainer.gqc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the sweep's {out}: the result is written here")
    parser.add_argument("--seed", type=int, default=0, help="model init and data order")
    parser.add_argument("--lr", type=float, default=3e-3, help="the rate of an optimizer step (constant)")
    parser.add_argument("--gqc", type=json.loads, default=None, help="the GQC section as JSON (null: GQC)")
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    args = parser.parse_args(argv)
    started = time.monotonic()

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                         max_position_embeddings=SEQ))
    training_args = TrainingArguments(
        args.out, per_device_train_batch_size=BATCH, per_device_eval_batch_size=64, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=True, seed=args.seed, data_seed=args.seed)
    recorder = RunRecorder()
    callback = Record(recorder)
    trainer = GQCTrainer(model=model, args=training_args, train_dataset=dataset(512, seed=0),
                         gqc=args.gqc or GQC, callbacks=[callback])
    callback.trainer = trainer
    trainer.train()
    val_loss = trainer.evaluate(eval_dataset=dataset(128, seed=1))["eval_loss"]
    if trainer.is_world_process_zero():
        tokens = trainer.gqc.num_batches * BATCH * SEQ * trainer.args.world_size
        Path(args.out, "log_history.json").write_text(json.dumps(trainer.state.log_history))
        recorder.write(args.out, val_loss=val_loss, tokens=tokens, wall_time=time.monotonic() - started)
        print(f"hf_sweep: val_loss {val_loss:.6f} after {trainer.state.global_step} steps, "
              f"{trainer.gqc.num_batches} micro-batches, lr {args.lr!r}")
    return val_loss


if __name__ == "__main__":
    main()
