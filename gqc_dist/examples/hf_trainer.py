"""A Hugging Face ``Trainer`` script with GQC: one class changed, one argument added.

    python -m gqc_dist.examples.hf_trainer                            # one process
    torchrun --nproc_per_node 2 -m gqc_dist.examples.hf_trainer       # DDP
    torchrun --nproc_per_node 2 -m gqc_dist.examples.hf_trainer --deepspeed   # DeepSpeed ZeRO-2

A 2-layer Llama built from its config (nothing is downloaded) learns a repeating token pattern on
the CPU (``--cpu``, the default without CUDA) in a few seconds. Under ``--deepspeed`` the GQC
section goes into the ds_config instead of ``gqc=``. Rank 0 prints the Trainer's own log lines:
``gqc/window`` is the mean number of micro-batches per optimizer step since the last line.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator on import

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from gqc_dist.frontends.hf import GQCTrainer  # was: from transformers import Trainer  # noqa: E402

GQC = {"algorithm": "cbc", "kappa": 4.0, "max_draws": 8}


def dataset(count=256, seq=16, vocab=32, seed=0):
    """Sequences that count up modulo ``vocab`` from a random start, with a little noise."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (count, 1), generator=generator)
    ids = (start + torch.arange(seq)) % vocab
    noise = torch.rand(count, seq, generator=generator) < 0.1
    ids = torch.where(noise, torch.randint(0, vocab, (count, seq), generator=generator), ids)
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps (GQC decides the micro-batches)")
    parser.add_argument("--out", default="runs/hf-trainer-example")
    parser.add_argument("--deepspeed", action="store_true", help="ZeRO-2, the GQC section inside the ds_config")
    parser.add_argument("--cpu", action="store_true", default=not torch.cuda.is_available())
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                                         max_position_embeddings=16))
    ds_config = None
    if args.deepspeed:
        ds_config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                     "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
                     "steps_per_print": 10**9, "gradient_quality_control": GQC}
    training_args = TrainingArguments(
        args.out, per_device_train_batch_size=4, max_steps=args.max_steps, learning_rate=3e-3,
        warmup_steps=3, logging_steps=5, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=args.cpu, deepspeed=ds_config, seed=0)
    trainer = GQCTrainer(model=model, args=training_args, train_dataset=dataset(),
                         gqc=None if args.deepspeed else GQC)  # the only other change: gqc=
    trainer.train()
    if trainer.is_world_process_zero():
        stats = trainer.gqc.statistics()
        print(f"optimizer steps {trainer.state.global_step} (GQC {stats['num_steps']}), micro-batches "
              f"{stats['num_batches']}, mean window {stats['num_batches'] / max(stats['num_steps'], 1):.2f}")
    return trainer


if __name__ == "__main__":
    main()
