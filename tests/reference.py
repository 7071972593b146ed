"""Independent single-process oracles: plain torch loops that implement GQC rules by hand.

Nothing here imports gqc_dist. Tests compare the library against these.
"""

import math

import pytest
import torch


def make_mlp(seed: int = 0, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    )


def micro_batches(count: int, batch: int = 4, seed: int = 1):
    """Deterministic (x, y) micro-batches."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 8, generator=generator), torch.randn(batch, 1, generator=generator))
        for _ in range(count)
    ]


# The GNTS scenario the DDP and FSDP2 tests share: threshold, draws per window, micro-steps, rows
# per rank per micro-batch.
THRESHOLD, MAX_DRAWS, MICRO_STEPS, LOCAL_BATCH = 0.45, 5, 24, 4


def global_batches(world_size: int):
    """The whole-model micro-batches of a data-parallel run of the shared scenario: rank r's
    micro-batch is row-chunk r of each."""
    return micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * world_size)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def reference_gnts(model, optimizer, batches, threshold, max_draws, poison=(), loss_fn=loss_of,
                   clip=None):
    """Hand-written GNTS: accumulate, ``||G_n||/n <= threshold`` or max draws -> mean, step, zero.

    ``loss_fn(model, batch)`` gives the micro-batch loss; ``clip``: clip the mean gradient to this
    global norm before stepping. ``poison``: micro-batch indices whose gradient is replaced by NaN; the whole window is then
    discarded (gradients zeroed, draws reset) without touching the optimizer.

    Returns (decisions, mean norms per micro-step).
    """
    decisions, norms = [], []
    draws = 0
    for index, batch in enumerate(batches):
        loss_fn(model, batch).backward()
        if index in poison:
            next(model.parameters()).grad.fill_(float("nan"))
        draws += 1
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        if not math.isfinite(total):
            for p in model.parameters():
                p.grad = None
            draws = 0
            decisions.append(False)
            norms.append(float("nan"))
            continue
        mean_norm = total / draws
        norms.append(mean_norm)
        stepped = mean_norm <= threshold or draws >= max_draws
        if stepped:
            for g in grads:
                g.div_(draws)
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            for p in model.parameters():
                p.grad = None
            draws = 0
        decisions.append(stepped)
    return decisions, norms


def reference_data_parallel(model, optimizer, batches, world_size, decide, rescale_to=None):
    """Hand-written data-parallel GQC on one process, for any rule.

    Each global micro-batch is split into ``world_size`` shards; the oracle computes every
    shard's gradient separately (what each rank would see before reduction), averages them
    (what DDP/FSDP deliver) and accumulates the window sum ``G``. ``decide(window)`` sees a dict
    with ``draws``, ``mean_norm`` (``||G||/draws``), ``shard_norms`` (all of the window's shard
    gradient norms, in order) and ``shard_losses`` (likewise) and returns True to step.
    ``rescale_to``: GNR, rescale the averaged gradient to this norm before stepping.

    Returns the decisions per micro-step.
    """
    params = [p for p in model.parameters()]
    window = {"draws": 0, "shard_norms": [], "shard_losses": []}
    total = [torch.zeros_like(p) for p in params]
    decisions = []
    for x, y in batches:
        shard_grads = []
        for xs, ys in zip(x.chunk(world_size), y.chunk(world_size)):
            loss = torch.nn.functional.mse_loss(model(xs), ys)
            grads = torch.autograd.grad(loss, params)
            shard_grads.append(grads)
            window["shard_losses"].append(loss.item())
            window["shard_norms"].append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
        for i in range(len(params)):
            total[i] += sum(g[i] for g in shard_grads) / world_size
        window["draws"] += 1
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in total))
        window["mean_norm"] = norm / window["draws"]
        stepped = decide(window)
        if stepped:
            factor = rescale_to / norm if rescale_to is not None else 1.0
            for p, t in zip(params, total):
                p.grad = t * factor / window["draws"]
            optimizer.step()
            for p in params:
                p.grad = None
            total = [torch.zeros_like(p) for p in params]
            window = {"draws": 0, "shard_norms": [], "shard_losses": []}
        decisions.append(stepped)
    return decisions


def assert_matches_oracle(results, oracle):
    """Every rank's per-micro-step decisions equal the oracle's, its ``mean_grad_norm`` within 1e-6
    relative (NaN in the oracle marks a dropped window), its final parameters within 1e-5.
    ``results``: per-rank dicts with decisions, norms, params; ``oracle``: (decisions, norms, params)."""
    decisions, norms, params = oracle
    assert True in decisions and False in decisions
    for rank, result in enumerate(results):
        assert "error" not in result, result
        assert result["decisions"] == decisions, f"rank {rank}"
        for got, want in zip(result["norms"], norms):
            if want == want:
                assert got == pytest.approx(want, rel=1e-6), f"rank {rank}"
        for got, want in zip(result["params"], params):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def reference_windows(grads, wanted, max_draws, probe, growth=2.0, min_draws=1, dither=False):
    """Window lengths of a noise-scale controller by hand, on gradients ``grads`` set as each
    micro-batch's gradient: accumulate; ``||G_n||^2`` of the accumulated gradient; per window, the
    increments ``d_n = ||G_n||^2 - ||G_{n-1}||^2 = (2n - 1) S + T`` fitted by least squares with
    weights ``1/n``; windows averaged with weights ``(N - 1) * position`` (the past scaled by
    old/new position at each fold); the window asks for ``ceil(wanted(T_sum, S_sum))``
    micro-batches (``dither``: ``floor(wanted + frac(i * 0.618...))`` for the ``i``-th window) (2
    before an estimate; ``inf``: one more than the last window), at most
    ``max(2, ceil(growth * last))``, in ``[min_draws, max_draws]``, and 2 on every
    ``probe``-th window while that is 1."""
    lengths, accumulated, n, previous, steps, last = [], None, 0, 0.0, 0, None
    fit = [0.0] * 5
    signal = noise = 0.0
    informative, position, last_position = 0, 0, 0
    for g in grads:
        g = g.double()
        accumulated = g.clone() if n == 0 else accumulated + g
        n += 1
        position += 1
        if n == 1:
            fit, previous = [0.0] * 5, 0.0
        sq = float((accumulated * accumulated).sum())
        a, w, d = 2 * n - 1, 1.0 / n, sq - previous
        previous = sq
        for i, value in enumerate((w * a * a, w * a, w, w * a * d, w * d)):
            fit[i] += value
        asked = 2 if informative == 0 else wanted(noise, signal)
        if math.isinf(asked):
            target = (last or 1) + 1
        elif dither and informative:
            target = math.floor(min(asked, max_draws) + math.fmod(steps * (math.sqrt(5) - 1) / 2, 1.0))
        else:
            target = math.ceil(asked - 1e-9)
        if last is not None:
            target = min(target, max(2, math.ceil(growth * last - 1e-9)))
        target = min(max(target, min_draws), max_draws)
        if target < 2 and steps % probe == 0:
            target = 2
        if n >= min(target, max_draws):
            if n >= 2:
                determinant = fit[0] * fit[2] - fit[1] ** 2
                s = (fit[2] * fit[3] - fit[1] * fit[4]) / determinant
                t = (fit[0] * fit[4] - fit[1] * fit[3]) / determinant
                decay = 0.0 if informative == 0 else last_position / position
                signal = decay * signal + (n - 1) * s
                noise = decay * noise + (n - 1) * t
                informative, last_position = informative + 1, position
            lengths.append(n)
            last, n, steps = n, 0, steps + 1
    return lengths
