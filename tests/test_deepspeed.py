"""gqc_dist.frontends.deepspeed.initialize on 2 real ranks (gloo, DS_ACCELERATOR=cpu), ZeRO 0-3, against the
single-process oracle on the whole model with the same micro-batches."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gqc_dist  # noqa: E402
import gqc_dist.frontends.deepspeed as gqc_deepspeed  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from reference import make_mlp, micro_batches, reference_gnts  # noqa: E402

WORLD = 2
LOCAL_BATCH = 4
THRESHOLD = 0.45
MAX_DRAWS = 5
MICRO_STEPS = 18
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def ds_config(stage, clip=0.0, bf16=False, **section):
    return {
        "train_micro_batch_size_per_gpu": LOCAL_BATCH,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "gradient_quality_control": {"algorithm": "gnts", "threshold": THRESHOLD,
                                     "max_draws": MAX_DRAWS, **section},
    }


def _ds_run(rank, world_size, config):
    import deepspeed

    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
    decisions, norms, samples = [], [], []
    for x, y in micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * world_size):
        x, y = x.chunk(world_size)[rank].to(dtype), y.chunk(world_size)[rank].to(dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        engine.backward(loss)
        decisions.append(engine.step())
        norms.append(engine.gqc.statistics()["mean_grad_norm"])
        samples.append(engine.global_samples)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=config["zero_optimization"]["stage"] == 3):
        final = [p.detach().float().clone() for p in params]
    return {"decisions": decisions, "norms": norms, "params": final, "samples": samples,
            "global_steps": engine.global_steps, "stats": engine.gqc.statistics()}


def _oracle(clip):
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    batches = micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * WORLD)
    decisions, norms = reference_gnts(model, optimizer, batches, THRESHOLD, MAX_DRAWS, clip=clip)
    return decisions, norms, [p.detach() for p in model.parameters()]


def _check(results, oracle, tol=1e-5, norm_rel=1e-6):
    decisions, norms, params = oracle
    assert True in decisions and False in decisions
    for rank, result in enumerate(results):
        assert result["decisions"] == decisions, f"rank {rank}"
        for got, want in zip(result["norms"], norms):
            assert got == pytest.approx(want, rel=norm_rel), f"rank {rank}"
        for got, want in zip(result["params"], params):
            torch.testing.assert_close(got, want, atol=tol, rtol=0)
        steps = sum(decisions)
        assert result["global_steps"] == steps
        # global_samples counts the micro-batches that went into optimizer steps
        last_step = max(i for i, d in enumerate(decisions) if d)
        assert result["samples"][last_step] == (last_step + 1) * LOCAL_BATCH * WORLD


@pytest.mark.parametrize("stage, clip", [(0, 0.0), (0, 0.3), (1, 0.3), (2, 0.0), (2, 0.3), (3, 0.3)])
def test_zero_stage_matches_single_process_oracle(stage, clip):
    results = run_distributed(_ds_run, WORLD, ds_config(stage, clip), timeout=300)
    _check(results, _oracle(clip))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_runs_with_rank_consistent_decisions(stage):
    results = run_distributed(_ds_run, WORLD, ds_config(stage, clip=0.3, bf16=True), timeout=300)
    decisions, norms, _ = _oracle(0.3)
    first = results[0]
    assert all(r["decisions"] == first["decisions"] for r in results)
    assert True in first["decisions"] and False in first["decisions"]
    assert first["global_steps"] == sum(first["decisions"])
    # Until the first optimizer step the weights are the same, so every accumulated norm of the
    # first window is the fp32 oracle's within bf16 precision.
    first_step = decisions.index(True)
    assert first_step >= 2
    for got, want in zip(first["norms"][: first_step + 1], norms[: first_step + 1]):
        assert got == pytest.approx(want, rel=1e-2)
    assert all(torch.isfinite(p).all() for p in first["params"])


def _ds_nan_run(rank, world_size, stage, poison_step):
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    decisions = []
    for index, (x, y) in enumerate(micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * world_size)):
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        if index == poison_step and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")  # one rank's micro-batch produces NaN gradients
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        decisions.append(engine.step())
    params = [p.detach().clone() for p in engine.module.parameters()]
    return {"decisions": decisions, "stats": engine.gqc.statistics(), "params": params,
            "global_steps": engine.global_steps}


@pytest.mark.parametrize("stage", [0, 2])
def test_nan_on_one_rank_drops_the_window_on_every_rank(stage):
    results = run_distributed(_ds_nan_run, WORLD, stage, 6, timeout=300)
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    decisions, _ = reference_gnts(model, optimizer, micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * WORLD),
                                  THRESHOLD, MAX_DRAWS, poison={6})
    for result in results:
        assert result["decisions"] == decisions
        assert result["stats"]["dropped_windows"] == 1
        assert result["global_steps"] == sum(decisions)
        for got, want in zip(result["params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- refusals, before training starts
REFUSED = [
    ({"managed_gradient_accumulation": True}, "managed_gradient_accumulation must be false"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps must be 1"),
    ({"zero_optimization": {"stage": 1, "overlap_comm": True}}, "zero_optimization.overlap_comm"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer"),
    ({"compile": {"deepcompile": True}}, "compile.deepcompile"),
    ({"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}}, "fp16 with zero_optimization.stage 0"),
    ({"gradient_clipping": -1}, "gradient_clipping must be a number >= 0"),
    ({"data_types": {"grad_accum_dtype": "fp32"}}, "data_types.grad_accum_dtype"),
    ({"pipeline": {"stages": 2}}, "pipeline parallelism"),
    ({"gradient_quality_control": {"algorithm": "gnts", "threshold": 0.5, "max_draw": 4}},
     "unknown key gradient_quality_control.max_draw"),
    ({"gradient_quality_control": {"algorithm": "gnts", "threshold": -1}}, "gradient_quality_control.threshold must be >= 0"),
    ({"gradient_quality_control": {"algorithm": "gns", "tolerance": 0.1}}, "'gns' is not supported on DeepSpeed"),
]


@pytest.mark.parametrize("change, message", REFUSED)
def test_options_that_cannot_work_are_refused_before_deepspeed_starts(change, message):
    config = ds_config(2)
    for key, value in change.items():
        config[key] = value
    with pytest.raises(gqc_dist.GQCConfigError, match=message):
        gqc_deepspeed.initialize(model=make_mlp(), optimizer=None, config=config)


def test_config_path_is_read_and_bad_json_is_named(tmp_path):
    bad = tmp_path / "ds_config.json"
    bad.write_text("{ not json")
    with pytest.raises(gqc_dist.GQCConfigError, match="ds_config.json"):
        gqc_deepspeed.initialize(model=make_mlp(), config=str(bad))


# ---------------------------------------------------------------- native DeepSpeed MoE, ep_size 2
class DSMoENet(torch.nn.Module):
    """Dense in/out layers around a deepspeed.moe MoE with 4 experts, no token dropping and no
    random token selection, so each token's output does not depend on how tokens are batched."""

    def __init__(self, ep_size):
        from deepspeed.moe.layer import MoE

        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, 16)
        expert = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())
        self.moe = MoE(16, expert=expert, num_experts=4, ep_size=ep_size, k=1, drop_tokens=False,
                       use_rts=False)
        self.out = torch.nn.Linear(16, 1)
        # make the (deep-copied) experts distinct, by their global expert index
        local = self.moe.num_local_experts
        ep_rank = dist.get_rank() % ep_size
        with torch.no_grad():
            for i, module in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                generator = torch.Generator().manual_seed(100 + ep_rank * local + i)
                for p in module.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=generator))

    def forward(self, x):
        hidden, _, _ = self.moe(torch.tanh(self.inp(x)))
        return self.out(hidden)


def _moe_groups(model):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})


def _ds_moe_run(rank, world_size, stage):
    model = DSMoENet(ep_size=2)
    optimizer = torch.optim.AdamW(_moe_groups(model), lr=1e-2, weight_decay=0.01)
    config = ds_config(stage, clip=0.3)
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    decisions, norms = [], []
    for x, y in micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * world_size):
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        decisions.append(engine.step())
        norms.append(engine.gqc.statistics()["mean_grad_norm"])
    dense = [p.detach().clone() for n, p in engine.module.named_parameters() if "experts" not in n]
    experts = [p.detach().clone() for n, p in engine.module.named_parameters() if "experts" in n]
    return {"decisions": decisions, "norms": norms, "dense": dense, "experts": experts,
            "groups": len(engine.gqc.param_groups)}


def _ds_moe_oracle(rank, world_size):
    """One process, ep_size 1 (all four experts local), the global micro-batches."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # deepspeed.comm wraps the existing group
    model = DSMoENet(ep_size=1)
    model.moe.set_deepspeed_parallelism()
    optimizer = torch.optim.AdamW(_moe_groups(model), lr=1e-2, weight_decay=0.01)
    decisions, norms = reference_gnts(model, optimizer, micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * WORLD),
                                      THRESHOLD, MAX_DRAWS, clip=0.3)
    dense = [p.detach().clone() for n, p in model.named_parameters() if "experts" not in n]
    experts = [p.detach().clone() for n, p in model.named_parameters() if "experts" in n]
    return decisions, norms, dense, experts


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_native_moe_ep2_dense_and_experts_in_one_optimizer_match_oracle(stage):
    results = run_distributed(_ds_moe_run, WORLD, stage, timeout=300)
    [(decisions, norms, dense, experts)] = run_distributed(_ds_moe_oracle, 1, timeout=300)
    assert True in decisions and False in decisions
    per_rank = len(experts) // WORLD
    for rank, result in enumerate(results):
        assert result["groups"] == 2  # dense and expert params in one optimizer
        assert result["decisions"] == decisions, f"rank {rank}"
        for got, want in zip(result["norms"], norms):
            assert got == pytest.approx(want, rel=1e-6), f"rank {rank}"
        for got, want in zip(result["dense"], dense):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for got, want in zip(result["experts"], experts[rank * per_rank:(rank + 1) * per_rank]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_native_moe_on_zero3_is_refused():
    results = run_distributed(_ds_moe_zero3, WORLD, timeout=300)
    assert all("stage 3" in message for message in results)


def _ds_moe_zero3(rank, world_size):
    model = DSMoENet(ep_size=2)
    try:
        gqc_deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(_moe_groups(model)),
                                 config=ds_config(3))
    except gqc_dist.GQCConfigError as error:
        return str(error)
    return "accepted"


# ---------------------------------------------------------------- fp16, dynamic loss scaling
def _ds_fp16_run(rank, world_size, stage, overflow_step):
    """fp16 on the real DeepSpeed fp16 path. DeepSpeed's CPU accelerator reports fp16 as
    unsupported (a capability flag: its fp16 optimizers and loss scaler run on CPU tensors), so
    the flag is lifted here; nothing else is replaced."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True
    config = ds_config(stage, clip=0.3)
    config["fp16"] = {"enabled": True, "initial_scale_power": 10, "hysteresis": 1}
    model = make_mlp()
    engine, _, _, _ = gqc_deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
        config=config)
    decisions, norms, scales, params_at = [], [], [], {}
    for index, (x, y) in enumerate(micro_batches(MICRO_STEPS, batch=LOCAL_BATCH * world_size)):
        x, y = x.chunk(world_size)[rank].half(), y.chunk(world_size)[rank].half()
        if index == overflow_step and rank == 1:
            x = x * 6e4  # fp16 activations overflow on this rank only
        engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y.float()))
        decisions.append(engine.step())
        norms.append(engine.gqc.statistics()["mean_grad_norm"])
        scales.append(engine.gqc._gradients.loss_scale())
        params_at[index] = [p.detach().float().clone() for p in engine.module.parameters()] if stage < 3 else None
    return {"decisions": decisions, "norms": norms, "scales": scales, "params_at": params_at,
            "stats": engine.gqc.statistics(), "skipped": engine.skipped_steps}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_overflow_on_one_rank_is_dropped_everywhere_and_never_reaches_the_optimizer(stage):
    overflow = 9
    results = run_distributed(_ds_fp16_run, WORLD, stage, overflow, timeout=300)
    oracle_decisions, oracle_norms, _ = _oracle(0.3)
    first = results[0]
    for result in results:
        assert result["decisions"] == first["decisions"] and result["scales"] == first["scales"]
        assert result["decisions"][overflow] is False
        assert result["stats"]["dropped_windows"] == 1 and result["stats"]["nonfinite_micro_batches"] == 1
        assert result["skipped"] == 1  # DeepSpeed's own overflow path skipped the update
    assert first["scales"][overflow] == first["scales"][overflow - 1] / 2  # backed off (hysteresis 1)
    assert True in first["decisions"] and first["decisions"].count(True) >= 2
    # the unscaled norms of the first window are the fp32 oracle's within fp16 precision
    first_step = oracle_decisions.index(True)
    assert first["decisions"][: first_step + 1] == oracle_decisions[: first_step + 1]
    for got, want in zip(first["norms"][: first_step + 1], oracle_norms[: first_step + 1]):
        assert got == pytest.approx(want, rel=1e-2)
    if stage < 3:  # the overflowing micro-batch did not change the weights
        for before, after in zip(first["params_at"][overflow - 1], first["params_at"][overflow]):
            assert torch.equal(before, after)


class _PartlyUnused(torch.nn.Module):
    """``extra`` gets a gradient only on odd micro-batches."""

    def __init__(self):
        super().__init__()
        self.mlp = make_mlp()
        self.extra = torch.nn.Linear(8, 1)

    def forward(self, x, use_extra):
        out = self.mlp(x)
        return out + self.extra(x) if use_extra else out


def _ds_unused_run(rank, world_size, stage):
    model = _PartlyUnused()
    engine, _, _, _ = gqc_deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        config={**ds_config(stage), "gradient_quality_control": {"algorithm": "fixed", "accumulation_steps": 2}})
    for index, (x, y) in enumerate(micro_batches(8, batch=LOCAL_BATCH * world_size)):
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        engine.backward(torch.nn.functional.mse_loss(engine(x, index % 2 == 1), y))
        engine.step()
    params = list(engine.module.parameters())
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return [p.detach().clone() for p in params]


@pytest.mark.parametrize("stage", [2, 3])
def test_parameter_without_gradient_in_a_window_start_matches_oracle(stage):
    """DeepSpeed's ZeRO-3 keeps stale gradient partitions after step(); GQC clears them."""
    results = run_distributed(_ds_unused_run, WORLD, stage, timeout=300)
    model = _PartlyUnused()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for index, (x, y) in enumerate(micro_batches(8, batch=LOCAL_BATCH * WORLD)):
        torch.nn.functional.mse_loss(model(x, index % 2 == 1), y).backward()
        if index % 2 == 1:
            for p in model.parameters():
                p.grad /= 2
            optimizer.step()
            optimizer.zero_grad()
    for result in results:
        for got, want in zip(result, model.parameters()):
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=0)


def _step_without_backward(rank, world_size):
    model = make_mlp()
    engine, _, _, _ = gqc_deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               config=ds_config(2))
    try:
        engine.step()
    except gqc_dist.GQCUsageError as error:
        return str(error)
    return "accepted"


def test_step_without_backward_is_refused_on_every_rank():
    assert all("exactly one engine.backward()" in r for r in run_distributed(_step_without_backward, WORLD, timeout=300))


def _ds_split_run(rank, world_size, stage):
    """Fixed windows of one micro-batch; every other micro-batch in two parts with
    ``gqc_after_part`` between their backwards. Returns the parameters and the noise estimate,
    and the refusal of a ``gqc_after_part`` that follows no backward."""
    model = make_mlp()
    engine, _, _, _ = gqc_deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        config={**ds_config(stage), "gradient_quality_control": {"algorithm": "fixed", "accumulation_steps": 1}})
    loss = torch.nn.functional.mse_loss
    for index, (x, y) in enumerate(micro_batches(8, batch=LOCAL_BATCH * world_size)):
        x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
        if index % 2:
            engine.backward(loss(engine(x[0::2]), y[0::2]) * 0.5)
            engine.gqc_after_part(0.5)
            engine.backward(loss(engine(x[1::2]), y[1::2]) * 0.5)
        else:
            engine.backward(loss(engine(x), y))
        assert engine.step()
    try:
        engine.gqc_after_part(0.5)
        refusal = "accepted"
    except gqc_dist.GQCUsageError as error:
        refusal = str(error)
    params = list(engine.module.parameters())
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return ([p.detach().clone() for p in params],
                engine.gqc.statistics()["gradient_noise_scale_micro_batches"], refusal)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_split_micro_batch_steps_as_the_whole_one(stage):
    """Oracle: plain torch SGD on the whole micro-batches; the split ones also inform the noise
    estimate, the same on every rank."""
    results = run_distributed(_ds_split_run, WORLD, stage, timeout=300)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in micro_batches(8, batch=LOCAL_BATCH * WORLD):
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    for params, noise_scale, refusal in results:
        for got, want in zip(params, model.parameters()):
            torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
        assert noise_scale == results[0][1] and noise_scale is not None
        assert "gqc_after_part() must follow exactly one engine.backward() (got 0)" in refusal
