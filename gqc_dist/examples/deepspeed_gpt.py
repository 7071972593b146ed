"""A plain DeepSpeed training loop with GQC: the only change is the import of ``initialize``.

    torchrun --nproc_per_node 2 -m gqc_dist.examples.deepspeed_gpt --deepspeed_config configs/ds_zero2.json
    deepspeed --num_gpus 2 --module gqc_dist.examples.deepspeed_gpt --deepspeed_config configs/ds_zero2.json

(Without CUDA, DeepSpeed's CPU accelerator is chosen unless ``DS_ACCELERATOR`` says otherwise;
``--device cpu`` forces it.) The ds_config's ``"gradient_quality_control"``
section turns ``engine.step()`` into a GQC decision; rank 0 prints one line per optimizer step
with the micro-batches it took.
"""

import argparse
import os

import sys

import torch

_FORCED_CPU = "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]
if not torch.cuda.is_available() or _FORCED_CPU:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator on import

from gqc_dist.frontends.deepspeed import initialize  # was: from deepspeed import initialize  # noqa: E402
from gqc_dist.train.corpus import ByteBatches, load_corpus  # noqa: E402
from gqc_dist.train.model import GPT, ModelConfig  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--micro-steps", type=int, default=60)
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the LOCAL_RANK GPU when CUDA is present (NCCL), else CPU (gloo)")
    args = parser.parse_args(argv)

    import deepspeed

    from gqc_dist.train.device import resolve_device

    device = resolve_device(args.device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = GPT(ModelConfig(seq_len=32, dim=32, layers=1, heads=2))
    engine, _, _, _ = initialize(model=model, model_parameters=model.parameters(),
                                 config=args.deepspeed_config)
    train, _ = load_corpus(max_bytes=500_000)
    batches = ByteBatches(train, 32, engine.train_micro_batch_size_per_gpu(), seed=0, rank=rank,
                          world_size=world)
    for micro_step in range(args.micro_steps):
        x, y = (t.to(engine.device) for t in batches.next())
        loss = engine.module.loss(x, y)
        engine.backward(loss)
        if engine.step() and rank == 0:
            stats = engine.gqc.statistics()
            print(f"micro-step {micro_step:3d} step {engine.global_steps:3d} draws {stats['last_num_draws']:2d} "
                  f"loss {loss.item():.3f} mean_grad_norm {stats['mean_grad_norm']:.4f} "
                  f"threshold {stats['gradient_norm_threshold']:.3f} lr {engine.get_lr()[0]:.2e} "
                  f"samples {engine.global_samples}", flush=True)


if __name__ == "__main__":
    main()
    # Exit without interpreter finalization. Gloo worker threads of groups that stay referenced
    # (DeepSpeed's own groups; torch's WORLD as a default argument) outlive the script, and one
    # that drops the last reference to a collective's tensor after Py_Finalize began must take
    # the GIL: CPython ends it with pthread_exit, whose unwind through a noexcept C++ destructor
    # aborts the rank ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
