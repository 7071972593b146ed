"""What the window check costs (issue 32): the per-parameter gradient hooks and the per-read
version compare of ``TorchOptimizerGradients``, against the same adapter with the check off.

One process, side by side: two copies of the same model train on the same micro-batches under
``OptimizerWrapperFixed`` (k = 4); ``check`` is the adapter as shipped, ``off`` the same adapter
whose ``_remember`` and ``outside_changes`` do nothing (no hooks registered, nothing compared).
The variants alternate within every repetition (the first one rotates), so the shared machine's
noise hits both alike. Timed: a whole micro-step (forward, backward with the hooks, ``step()``).
Printed per model: median micro-step time of each, the paired added time (median of per-repetition
differences) and its ratio to ``off``'s micro-step, and the spread of the ``off``-``off`` split
halves (the noise floor: an added time below it is no result).

    python benchmarks/window_check.py           # ~1 min on 2 shared cores
"""

import argparse
import statistics
import time

import torch

import gqc_dist
from gqc_dist.engines.torch_optimizer import TorchOptimizerGradients
from gqc_dist.train.model import GPT, ModelConfig


def models():
    """The main job's GPT (3 blocks, 32 parameter tensors) and a deep narrow MLP (many tensors,
    little compute per tensor: where per-parameter hooks weigh most)."""
    def gpt():
        return GPT(ModelConfig(seq_len=128, dim=128, layers=3, heads=4), seed=0)

    def mlp():
        torch.manual_seed(0)
        layers = [m for _ in range(48) for m in (torch.nn.Linear(64, 64), torch.nn.Tanh())]
        return torch.nn.Sequential(*layers)

    def gpt_batch(generator):
        x = torch.randint(0, 256, (16, 128), generator=generator)
        return x, torch.roll(x, -1, 1)

    def mlp_batch(generator):
        return torch.randn(32, 64, generator=generator), torch.randn(32, 64, generator=generator)

    def gpt_loss(model, x, y):
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def mlp_loss(model, x, y):
        return torch.nn.functional.mse_loss(model(x), y)

    return {"gpt (main job, 32 tensors)": (gpt, gpt_batch, gpt_loss),
            "mlp (48 x Linear(64, 64), 96 tensors)": (mlp, mlp_batch, mlp_loss)}


def variant(build, check: bool):
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gradients = TorchOptimizerGradients(optimizer)
    if not check:
        gradients._remember = lambda grads: None
        gradients.outside_changes = lambda: (0, 0, 0)
    return model, gqc_dist.OptimizerWrapperFixed(optimizer, 4, gradients=gradients)


def micro_step(model, wrapper, loss_fn, batch) -> float:
    start = time.perf_counter()
    loss_fn(model, *batch).backward()
    wrapper.step()
    return time.perf_counter() - start


def measure(build, make_batch, loss_fn, repetitions: int):
    generator = torch.Generator().manual_seed(0)
    variants = {"check": variant(build, True), "off": variant(build, False), "off2": variant(build, False)}
    times = {name: [] for name in variants}
    names = list(variants)
    for rep in range(repetitions + 2):
        batches = [make_batch(generator) for _ in range(4)]  # one window, the same for every variant
        order = names[rep % 3:] + names[:rep % 3]
        for name in order:
            model, wrapper = variants[name]
            spent = sum(micro_step(model, wrapper, loss_fn, b) for b in batches) / len(batches)
            if rep >= 2:  # two warm-up windows
                times[name].append(spent)
    added = statistics.median(c - o for c, o in zip(times["check"], times["off"]))
    floor = statistics.median(abs(a - b) for a, b in zip(times["off"], times["off2"]))
    return statistics.median(times["check"]), statistics.median(times["off"]), added, floor


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"window check cost, 1 process, {args.repetitions} repetitions of a 4-micro-step window, "
          "medians per micro-step")
    for name, (build, make_batch, loss_fn) in models().items():
        check, off, added, floor = measure(build, make_batch, loss_fn, args.repetitions)
        print(f"{name}: check {check * 1e3:.2f} ms, off {off * 1e3:.2f} ms, added {added * 1e6:+.0f} us "
              f"({added / off:+.2%}), off-vs-off noise {floor * 1e6:.0f} us ({floor / off:.2%})")


if __name__ == "__main__":
    main()
