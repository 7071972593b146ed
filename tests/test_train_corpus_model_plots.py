"""gqc_dist.train: corpus and batches, the byte-level GPT, metric plots (single process, fast)."""

import json
import math

import matplotlib.image
import pytest
import torch

from gqc_dist.train.corpus import ByteBatches, evaluate_batches, load_corpus
from gqc_dist.train.model import GPT, ModelConfig, block_modules, count_parameters
from gqc_dist.train.plots import plot_compare, plot_run


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=1_000_000)


def test_corpus_deterministic_nonempty(corpus):
    train, val = corpus
    assert train.dtype == val.dtype == torch.uint8
    assert train.numel() > 0 and val.numel() > 0
    assert train.numel() + val.numel() == 1_000_000
    again = load_corpus(max_bytes=1_000_000)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert b"def " in bytes(train[:200_000].tolist())


def test_corpus_user_path_and_errors(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(b"hello world " * 100)
    train, val = load_corpus(path=text, val_fraction=0.1)
    assert train.numel() + val.numel() == 1201 and 0 < val.numel() <= 121
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(path=tmp_path / "empty")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=0.0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_concatenate_to_global_batch(corpus, world):
    train = corpus[0]
    single = ByteBatches(train, seq_len=16, batch_size=3 * world, seed=7)
    ranks = [ByteBatches(train, 16, 3, 7, rank=r, world_size=world) for r in range(world)]
    assert single.tokens_per_draw == ranks[0].tokens_per_draw == 3 * world * 16
    for _ in range(3):
        x, y = single.next()
        parts = [b.next() for b in ranks]
        assert x.shape == (3 * world, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_resume_draws_same_batches(corpus):
    batches = ByteBatches(corpus[0], 32, 4, seed=1, rank=1, world_size=2)
    batches.next()
    state = batches.state_dict()
    expected = [batches.next() for _ in range(3)]
    resumed = ByteBatches(corpus[0], 32, 4, seed=999, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next() for _ in range(3))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.draws == 4
    with pytest.raises(ValueError, match="global_batch_size"):
        ByteBatches(corpus[0], 32, 4, seed=1).load_state_dict(state)


def test_evaluate_batches_fixed(corpus):
    val = corpus[1]
    first = evaluate_batches(val, 32, 4, 5)
    assert len(first) == 5 and all(x.shape == (4, 32) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, evaluate_batches(val, 32, 4, 5)))
    assert torch.equal(first[-1][1][-1], val[-32:].long())


@pytest.mark.parametrize("experts", [0, 4])
def test_gpt_forward_backward_and_initial_loss(corpus, experts):
    config = ModelConfig(seq_len=32, num_experts=experts)
    model = GPT(config, seed=3)
    x, y = ByteBatches(corpus[0], 32, 8, seed=0).next()
    assert model(x).shape == (8, 32, 256)
    loss = model.loss(x, y)
    assert abs(loss.item() - math.log(256)) < 0.3
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    modules = block_modules(model)
    assert len(modules) == (config.layers if experts == 0 else 4 * config.layers)
    if experts:
        sharded = {id(p) for m in modules for p in m.parameters()}
        assert not any(id(p) in sharded for b in model.blocks for p in (b.mlp.w_in, b.mlp.w_out))


@pytest.mark.parametrize("experts", [0, 4])
def test_gpt_same_seed_identical(experts):
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    config = ModelConfig(num_experts=experts)
    a, b, c = GPT(config, seed=5), GPT(config, seed=5), GPT(config, seed=6)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r) or name.startswith(("ln", "blocks.0.ln", "blocks.1.ln")), name
    if experts:
        assert not torch.equal(a.blocks[0].mlp.w_in, a.blocks[1].mlp.w_in)


@pytest.mark.parametrize("field, value", [
    ("dim", 30), ("heads", 0), ("seq_len", -1), ("layers", 0), ("mlp_ratio", 1.5),
    ("num_experts", -2), ("ep_size", 3), ("dropout", 1.0)])
def test_model_config_validate_names_field(field, value):
    config = ModelConfig(num_experts=4)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=field):
        config.validate()
    with pytest.raises(ValueError, match=field):
        GPT(config)


def test_model_config_ep_checks():
    with pytest.raises(ValueError, match="ep_size"):
        ModelConfig(ep_size=2).validate()  # a dense model has no experts to split
    with pytest.raises(ValueError, match="ep_size"):
        GPT(ModelConfig(num_experts=4, ep_size=2))  # no ep_group of 2 ranks
    assert ModelConfig().validate() == ModelConfig()


def _write_metrics(path, steps=12, threshold=True, val=True):
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "config", "note": "ignored"}) + "\n")
        for step in range(1, steps + 1):
            f.write(json.dumps({
                "kind": "step", "step": step, "tokens": 512 * step * step, "loss": 5.5 / step,
                "draws": step, "threshold": 2.0 / step if threshold else None,
                "mean_grad_norm": 1.5 / step, "lr": 1e-3, "samples": 8 * step,
                "wall_time": 0.1 * step}) + "\n")
            if val and step % 4 == 0:
                f.write(json.dumps({"kind": "val", "step": step, "tokens": 512 * step * step,
                                    "val_loss": 6.0 / step}) + "\n")


def test_plot_run_and_compare(tmp_path):
    gqc, baseline = tmp_path / "gqc.jsonl", tmp_path / "base.jsonl"
    _write_metrics(gqc)
    _write_metrics(baseline, threshold=False, val=False)
    for metrics in (gqc, baseline):
        out = plot_run(metrics, tmp_path / f"{metrics.stem}.png", title="run")
        assert matplotlib.image.imread(out).shape[:2] == (900, 1200)
    out = plot_compare([("gqc", gqc), ("baseline", baseline)], tmp_path / "cmp" / "compare.png")
    assert matplotlib.image.imread(out).shape[:2] == (900, 1200)


def test_plots_reject_bad_files(tmp_path):
    empty, bad_json, missing = (tmp_path / n for n in ("empty.jsonl", "bad.jsonl", "miss.jsonl"))
    empty.write_text("")
    bad_json.write_text('{"kind": "step", "step": 1\n')
    missing.write_text(json.dumps({"kind": "step", "step": 1, "tokens": 64, "draws": 1}) + "\n")
    for path in (empty, bad_json, missing, tmp_path / "absent.jsonl"):
        with pytest.raises(ValueError, match=path.name):
            plot_run(path, tmp_path / "x.png")
    with pytest.raises(ValueError, match="loss"):
        plot_run(missing, tmp_path / "x.png")
    with pytest.raises(ValueError, match=missing.name):
        plot_compare([("a", missing)], tmp_path / "y.png")
