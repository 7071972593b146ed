"""engine.save_checkpoint / engine.load_checkpoint of gqc_dist.frontends.deepspeed engines on 2 real ranks
(gloo, DS_ACCELERATOR=cpu): resuming in a fresh engine, at a step boundary and mid-window, is
bitwise the uninterrupted run on ZeRO 1-3, and checkpoints that carry no (or another algorithm's)
GQC state are refused before anything changes."""

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gqc_dist  # noqa: E402
from gqc_dist.core import checkpoint_state  # noqa: E402
import gqc_dist.frontends.deepspeed as gqc_deepspeed  # noqa: E402
from distributed_harness import run_distributed  # noqa: E402
from reference import make_mlp, micro_batches  # noqa: E402

WORLD = 2
LOCAL_BATCH = 4
# A threshold schedule that decides some windows by the threshold and some at max_draws; its
# warm-up threshold is 10x, so a resume that lost the schedule's position steps every micro-batch.
GNTS = {"algorithm": "gnts", "max_draws": 4,
        "schedule": {"num_training_steps": 10, "num_warmup_steps": 1, "initial_threshold": 1.5,
                     "final_threshold": 1.0}}
CBC = {"algorithm": "cbc", "kappa": 4, "max_draws": 4, "probe_interval": 3}
# (name, micro-steps before the save, tag): measured decisions of GNTS here are
# T F T F T F T | F T F T F F | F T (steps after micro-steps 1, 3, 5, 7, 9, 11, 15), of CBC
# F T T T F T | F F F T F F (windows 2, 1, 1, 2, then 4 once its noise-scale estimate says so)
GNTS_POINTS = [("boundary", 7, None), ("mid-window", 13, "mid")]
GNTS_MICRO_STEPS = 15
CBC_POINTS = [("boundary", 6, None), ("mid-window", 9, "mid")]
CBC_MICRO_STEPS = 12


def ds_config(stage, section=None):
    config = {
        "train_micro_batch_size_per_gpu": LOCAL_BATCH,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        # the lr changes every optimizer step, so a lost lr scheduler position would show
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                     "warmup_num_steps": 10}},
    }
    if section is not None:
        config["gradient_quality_control"] = section
    return config


def _engine(stage, section):
    import deepspeed

    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    initialize = deepspeed.initialize if section is None else gqc_deepspeed.initialize
    engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=ds_config(stage, section))
    return engine


def _train(engine, rank, batches):
    decisions = []
    for x, y in batches:
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        decisions.append(engine.step())
    return decisions


def _summary(engine, decisions):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        final = [p.detach().float().clone() for p in params]
    return {"decisions": decisions, "params": final, "global_steps": engine.global_steps,
            "global_samples": engine.global_samples, "lr": engine.get_lr(),
            # the controller's state; the measured costs (cost_*) are wall-clock timings, not state
            "stats": {k: v for k, v in engine.gqc.statistics().items() if not k.startswith("cost_")}
            if hasattr(engine, "gqc") else None}


def _controller_state(engine):
    stats = engine.gqc.statistics()
    keys = [*checkpoint_state.COUNTERS, "gradient_noise_scale_micro_batches", "gradient_noise_trace",
            *engine.gqc.SCHEDULABLE]
    return {key: stats.get(key) for key in keys} | {"schedule": engine.gqc_session.schedule.state_dict()
                                                    if engine.gqc_session.schedule is not None else None}


def _refused(engine, rank, load_dir, batch):
    """Load ``load_dir`` into ``engine``; the refusal's message and whether the engine stayed as
    it was (and still trains: no rank is left waiting in a collective)."""
    before = _summary(engine, [])
    try:
        engine.load_checkpoint(load_dir)
        message = None
    except gqc_dist.GQCError as error:
        message = f"{type(error).__name__}: {error}"
    after = _summary(engine, [])
    unchanged = (all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
                 and {k: before[k] for k in ("global_steps", "global_samples", "lr", "stats")}
                 == {k: after[k] for k in ("global_steps", "global_samples", "lr", "stats")})
    _train(engine, rank, [batch])
    return {"message": message, "unchanged": unchanged}


def _resume_table(rank, world_size, stage, section, points, micro_steps, directory, refuse=None):
    """The uninterrupted run, and per point: train k micro-steps, save, a new engine loads and
    trains the rest. ``refuse``: ``"plain"`` (a plain DeepSpeed checkpoint) or ``"gnts"`` (this
    run's checkpoint into a GNTS engine) is loaded into a GQC engine and must be refused."""
    batches = micro_batches(micro_steps, batch=LOCAL_BATCH * world_size)
    out = {"full": _summary(engine := _engine(stage, section), _train(engine, rank, batches)), "points": {}}
    for name, k, tag in points:
        first = _engine(stage, section)
        decisions = _train(first, rank, batches[:k])
        draws_at_save = first.gqc.num_draws
        saved_tag = tag or f"global_step{first.global_steps}"  # DeepSpeed's default tag
        first.save_checkpoint(os.path.join(directory, name), tag=tag, client_state={"user": name})
        del first
        second = _engine(stage, section)
        load_path, client_state = second.load_checkpoint(os.path.join(directory, name), tag=tag)
        loaded = _controller_state(second)
        # DeepSpeed's arguments pass through; GQC's state is restored without DeepSpeed's optimizer
        # and lr scheduler states too (then nothing restores the schedule's values but GQC)
        third = _engine(stage, section)
        third.load_checkpoint(os.path.join(directory, name), tag=tag, load_optimizer_states=False,
                              load_lr_scheduler_states=False)
        decisions += _train(second, rank, batches[k:])
        out["points"][name] = {**_summary(second, decisions), "draws_at_save": draws_at_save,
                               "loaded": loaded, "loaded_without_optimizer": _controller_state(third),
                               "load_path": load_path, "client_state": client_state, "tag": saved_tag,
                               "files": sorted(os.listdir(os.path.join(directory, name, saved_tag)))}
    if refuse == "plain":
        plain = _engine(stage, None)
        _train(plain, rank, batches[:2])
        plain.save_checkpoint(os.path.join(directory, "plain"))
        engine = _engine(stage, section)
        _train(engine, rank, batches[:3])
        out["refused"] = _refused(engine, rank, os.path.join(directory, "plain"), batches[3])
    elif refuse == "gnts":
        engine = _engine(stage, GNTS)
        _train(engine, rank, batches[:3])
        out["refused"] = _refused(engine, rank, os.path.join(directory, "boundary"), batches[3])
    return out


def _check_table(results, points):
    table = {}
    for rank, result in enumerate(results):
        full = result["full"]
        assert True in full["decisions"] and False in full["decisions"]
        for name, k, tag in points:
            got = result["points"][name]
            where = f"rank {rank}, {name} (saved after micro-step {k})"
            assert (got["draws_at_save"] > 0) == (name == "mid-window"), where
            assert got["decisions"] == full["decisions"], where
            assert got["global_steps"] == full["global_steps"], where
            assert got["global_samples"] == full["global_samples"], where
            assert got["lr"] == full["lr"], where
            assert got["stats"] == full["stats"], where
            exact = all(torch.equal(a, b) for a, b in zip(got["params"], full["params"]))
            table[(rank, name)] = exact or max((a - b).abs().max().item()
                                               for a, b in zip(got["params"], full["params"]))
            # DeepSpeed's own return value: the checkpoint's path and the caller's client_state
            assert os.sep + got["tag"] + os.sep in got["load_path"], where
            assert got["client_state"]["user"] == name, where
            assert got["loaded_without_optimizer"] == got["loaded"], where
            assert f"gqc_state_rank{rank}.pt" in got["files"], where
    assert all(value is True for value in table.values()), f"parameters differ: {table}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gnts_resumes_bitwise_at_a_boundary_and_mid_window(stage, tmp_path):
    refuse = "plain" if stage == 2 else None
    results = run_distributed(_resume_table, WORLD, stage, GNTS, GNTS_POINTS, GNTS_MICRO_STEPS,
                              str(tmp_path), refuse, timeout=300)
    _check_table(results, GNTS_POINTS)
    if refuse:
        for rank, result in enumerate(results):
            refused = result["refused"]
            assert refused["message"] is not None, f"rank {rank} loaded a plain DeepSpeed checkpoint"
            assert refused["message"].startswith("CheckpointError"), refused["message"]
            assert "no gradient_quality_control state" in refused["message"]
            assert "plain DeepSpeed" in refused["message"]
            assert refused["unchanged"], f"rank {rank}: the refused load changed the engine"


def test_cbc_resumes_bitwise_on_stage_2_and_another_algorithm_is_refused(tmp_path):
    results = run_distributed(_resume_table, WORLD, 2, CBC, CBC_POINTS, CBC_MICRO_STEPS, str(tmp_path),
                              "gnts", timeout=300)
    _check_table(results, CBC_POINTS)
    for rank, result in enumerate(results):
        refused = result["refused"]
        assert refused["message"] is not None, f"rank {rank} loaded a CBC checkpoint into GNTS"
        assert refused["message"].startswith("CheckpointError"), refused["message"]
        assert "algorithm 'cbc'" in refused["message"] and "'gnts'" in refused["message"]
        assert refused["unchanged"], f"rank {rank}: the refused load changed the engine"
