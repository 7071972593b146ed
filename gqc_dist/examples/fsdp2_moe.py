"""FSDP2 + expert-parallel MoE, one optimizer, GNTS, under torchrun.

    torchrun --nproc_per_node 4 -m gqc_dist.examples.fsdp2_moe --ep-size 2

Dense layers (input, router, output) are FSDP2-sharded over the world; experts are split over
expert-parallel groups of ``--ep-size`` ranks and replicated across them. Every rank prints a
line per optimizer step; the lines are identical on every rank (only the rank prefix differs).
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gqc_dist
from gqc_dist.engines.moe import ExpertParallelMoE, expert_param_groups, expert_parallel_groups, reduce_expert_grads
from gqc_dist.train.device import DEVICES, resolve_device


class Net(torch.nn.Module):
    def __init__(self, ep_group, dim=16, experts=4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, dim)
        self.moe = ExpertParallelMoE(dim, 2 * dim, experts, ep_group)
        self.out = torch.nn.Linear(dim, 1)

    def forward(self, x):
        return self.out(self.moe(torch.tanh(self.inp(x))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--micro-steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per rank per micro-step")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: each rank on its LOCAL_RANK GPU when CUDA is present (NCCL), else CPU")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_group, edp_group = expert_parallel_groups(args.ep_size)
    model = Net(ep_group).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for dense in (model.inp, model.moe.router, model.out):
        fully_shard(dense, mesh=mesh)
    reduce_expert_grads(model, edp_group, world)
    optimizer = torch.optim.AdamW(expert_param_groups(model, ep_group, lr=3e-3, weight_decay=0.01))
    gqc, schedule = gqc_dist.make_gnts_with_cosine_annealing_schedule(
        optimizer, num_training_steps=30, num_warmup_steps=2, initial_threshold=1.2,
        final_threshold=0.6, max_batch_draws=8)

    generator = torch.Generator().manual_seed(1234 + rank)  # each rank draws its own data
    target = torch.randn(8, 1, generator=torch.Generator().manual_seed(7))
    for micro_step in range(args.micro_steps):
        x = torch.randn(args.micro_batch, 8, generator=generator)
        y = torch.sin(x @ target) + 0.1 * torch.randn(args.micro_batch, 1, generator=generator)
        x, y = x.to(device), y.to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if gqc.step():
            schedule.step()
            stats = gqc.statistics()
            print(f"[rank {rank}] micro-step {micro_step:3d} optimizer step {stats['num_steps']:3d} "
                  f"draws {stats['last_num_draws']:2d} mean_grad_norm {stats['mean_grad_norm']:.6f} "
                  f"threshold {stats['gradient_norm_threshold']:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # destroy_process_group() leaves the expert groups' gloo threads running; exit without
    # interpreter finalization (see examples/deepspeed_gpt.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
