"""How precise one noise probe is: a micro-batch split in two halves (CBC ``probe="split"``)
against a second micro-batch (``probe="extra"``), at fixed parameters.

gqc-train's ``third`` model (64-token sequences, width 64, 4 layers) is trained for a while at
fixed k = 1, then frozen. Each probe gives the two-point estimate the wrapper folds in
(``gqc_dist.core.noise_scale``: the increments of the accumulated squared norm at ``n = 1/2, 1``
for a split, ``n = 1, 2`` for an extra micro-batch), in units of one micro-batch: ``|G|^2``
(signal) and ``T = tr(Sigma) / B`` (noise). The reference is the direct spread of all the
micro-batch gradients drawn. Prints each probe's mean and the standard error of that mean.

    python benchmarks/probe_contrasts.py --micro-batch 32 --train-steps 200 --probes 200
"""

import argparse
import math

import torch

from gqc_dist.train.corpus import ByteBatches, load_corpus
from gqc_dist.train.model import GPT, ModelConfig, token_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=32, help="sequences per micro-batch (even)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(ModelConfig(seq_len=64, dim=64, layers=4, heads=2), seed=0)
    data, _ = load_corpus(max_bytes=4_000_000)
    batches = ByteBatches(data, 64, args.micro_batch, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.train_steps):
        x, y = batches.next()
        token_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    def grad(x, y, weight=1.0):
        model.zero_grad()
        (token_loss(model(x), y) * weight).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    def sq(v):
        return float(v @ v)

    split, extra, whole = [], [], []
    for _ in range(args.probes):
        x, y = batches.next()
        half = grad(x[0::2], y[0::2], 0.5)  # the accumulated gradient after the first part
        full = half + grad(x[1::2], y[1::2], 0.5)
        d1, d2 = sq(half), sq(full) - sq(half)  # E d1 = |G|^2/4 + T/2, E d2 = 3|G|^2/4 + T/2
        signal = 2 * (d2 - d1)
        split.append((signal, 2 * d1 - signal / 2))
        second = grad(*batches.next())
        d1, d2 = sq(full), sq(full + second) - sq(full)  # E d1 = |G|^2 + T, E d2 = 3|G|^2 + T
        signal = (d2 - d1) / 2
        extra.append((signal, d1 - signal))
        whole += [full, second]
    mean = torch.stack(whole).mean(0)
    noise = sum(sq(g - mean) for g in whole) / (len(whole) - 1)
    print(f"micro-batch {args.micro_batch} sequences, {args.train_steps} steps trained, {args.probes} probes of each kind")
    print(f"  direct (all {len(whole)} micro-batch gradients): |G|^2 {sq(mean) - noise / len(whole):.5f}  "
          f"T {noise:.5f}  B_simple {noise / (sq(mean) - noise / len(whole)):.2f} micro-batches")
    for name, rows in (("split", split), ("extra", extra)):
        stats = []
        for column in range(2):
            values = [row[column] for row in rows]
            m = sum(values) / len(values)
            sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
            stats.append((m, sd / math.sqrt(len(values))))
        (s, s_err), (t, t_err) = stats
        print(f"  {name:5s} probes: |G|^2 {s:.5f} +- {s_err:.5f}  T {t:.5f} +- {t_err:.5f}  B_simple {t / s:.2f}")


if __name__ == "__main__":
    main()
