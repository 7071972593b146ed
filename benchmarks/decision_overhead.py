"""What deciding costs per micro-step: gqc_dist vs torch-gqc vs plain fixed accumulation.

One process, CPU, fp32. For models with more and more parameter tensors, each variant runs the
same micro-batches (forward, backward, then the variant's per-micro-step call) and the time of
that call alone is recorded:

* ``fixed``: plain accumulation, ``optimizer.step(); optimizer.zero_grad()`` every K micro-steps;
* ``gqc_dist``: ``OptimizerWrapperGNTS.step()`` (one fused norm pass, one host sync);
* ``torch-gqc``: torch-gqc 0.10.4's ``OptimizerWrapperGNTS.step()`` (a norm and ``.item()`` per tensor).

Threshold 0 makes both GQC wrappers step every K = max_draws micro-steps, exactly like ``fixed``,
so the optimizer work is identical and the difference is the cost of measuring and deciding.
Variants are interleaved round by round and medians reported, because this machine is shared.

    python benchmarks/decision_overhead.py [--rounds 5] [--micro-steps 64]
"""

import argparse
import statistics
import time

import torch

import gqc_dist

K = 8


def make_model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
                                 for _ in range(layers)])


class Fixed:
    """Plain fixed accumulation: the baseline every GQC wrapper is compared with."""

    def __init__(self, optimizer):
        self.optimizer, self.count = optimizer, 0

    def step(self):
        self.count += 1
        if self.count % K == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)
            return True
        return False


def make_variant(name, model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "fixed":
        return Fixed(optimizer)
    if name == "gqc_dist":
        wrapper = gqc_dist.OptimizerWrapperGNTS(optimizer, K)
    else:
        import gradient_quality_control as torch_gqc

        wrapper = torch_gqc.OptimizerWrapperGNTS(optimizer, K)
    wrapper.param_groups[0]["gradient_norm_threshold"] = 0.0
    return wrapper


def time_variant(name, layers, width, micro_steps, batches):
    """Median seconds of the per-micro-step call, over ``micro_steps`` micro-steps."""
    model = make_model(layers, width)
    variant = make_variant(name, model)
    seconds, steps = [], 0
    for x, y in batches[:micro_steps]:
        torch.nn.functional.mse_loss(model(x), y).backward()
        start = time.perf_counter()
        steps += bool(variant.step())
        seconds.append(time.perf_counter() - start)
    assert steps == micro_steps // K, (name, steps)  # every variant stepped on the same micro-steps
    return statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--micro-steps", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = ["fixed", "gqc_dist", "torch-gqc"]
    print(f"per-micro-step call, median over {args.micro_steps} micro-steps, best of {args.rounds} "
          f"interleaved rounds; K = {K}; torch {torch.__version__}, 1 thread")
    print(f"{'tensors':>8} {'params':>10} | {'fixed us':>9} {'gqc_dist us':>12} {'torch-gqc us':>13} | "
          f"{'gqc_dist - fixed':>16} {'torch-gqc - fixed':>17} {'ratio':>6}")
    for layers, width in [(4, 64), (32, 64), (128, 64), (16, 512)]:
        generator = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, width, generator=generator), torch.randn(16, width, generator=generator))
                   for _ in range(args.micro_steps)]
        best = {name: float("inf") for name in names}
        for _ in range(args.rounds):
            for name in names:
                best[name] = min(best[name], time_variant(name, layers, width, args.micro_steps, batches))
        us = {name: best[name] * 1e6 for name in names}
        ours, theirs = us["gqc_dist"] - us["fixed"], us["torch-gqc"] - us["fixed"]
        params = layers * (width * width + width)
        print(f"{2 * layers:>8} {params:>10,} | {us['fixed']:>9.1f} {us['gqc_dist']:>12.1f} {us['torch-gqc']:>13.1f} | "
              f"{ours:>16.1f} {theirs:>17.1f} {theirs / max(ours, 1e-9):>5.1f}x")
    print("ratio = torch-gqc's extra cost over fixed accumulation / gqc_dist's extra cost over it")


if __name__ == "__main__":
    main()
