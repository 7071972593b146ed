"""One torchrun launch of the torchtitan recipe tests (``tests/test_integration_torchtitan.py``):
torchtitan's imports cost ~10 s per process, so the runs share one launch. Every rank:

1. runs torchtitan's entry point (``--module torchtitan_helpers --config recorded`` through its
   ``ConfigManager``, ``Config.build()``, ``train()``, ``close()``) for the recorded GQC run: FSDP2 over the 2 ranks, checkpoints at steps
   2 and 4 and at the last step;
2. runs it again, resuming from the step-2 checkpoint (``--checkpoint.load_step 2``);
3. runs gqc_dist's own loop (the oracle: the wrapper driven by hand on a plain torch AdamW, FSDP2
   with its default mean reduction, a torch LambdaLR with the schedule written out by hand) on
   the same micro-batches from the recorded run's initial parameters;

4. checks that a run with gradient accumulation 2 is refused;

saves what it saw to ``$GQC_TITAN_OUT/rank<r>.pt`` for the test to compare, and then

5. runs the example (``gqc_dist.examples.torchtitan_tiny.main``, i.e. ``torchtitan.train.main``)
   for 4 steps; the test reads its ``gqc:`` log lines.
"""

import os
import time
import types

import torch


def apply_cpu_shim() -> None:
    """torchtitan 0.3.0 picks ``"cuda"`` when no accelerator is found (``tools/utils.py``:
    ``_get_available_device_type() or "cuda"``) and binds ``device_type``/``device_module`` at
    import time in several modules; this points them at the CPU before anything imports
    ``torchtitan.trainer`` (``DeviceMemoryMonitor`` needs the memory calls, ``torch.cpu`` has
    none). gloo is then chosen by torchtitan itself."""
    import torchtitan.tools.utils as tools

    tools.device_type = "cpu"
    tools.device_module = types.SimpleNamespace(
        set_device=lambda device: None, device_count=lambda: 1, current_device=lambda: 0,
        get_device_name=lambda device=None: "cpu", is_available=lambda: True,
        get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=1 << 34),
        reset_peak_memory_stats=lambda *args: None, empty_cache=lambda: None,
        memory_stats=lambda *args: {}, synchronize=lambda *args: None, manual_seed=torch.manual_seed)


def titan_run(*args) -> float:
    """torchtitan's entry point (``torchtitan.train.main``) on the recorded config with ``args``,
    minus its last line: main() destroys the process group, and a group re-created in the same
    process under torchrun reuses the old group's rendezvous keys (torch resets its group counter
    on destroy) and hangs. So the first run initialises the group (torchtitan's
    ``init_distributed``), the later ones and the oracle reuse it. Returns the seconds taken."""
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    start = time.perf_counter()
    init_logger()
    config = ConfigManager().parse_args(["--module", "torchtitan_helpers", "--config", "recorded", *map(str, args)])
    trainer = config.build()  # GQCTrainer.Config.build() constructs the trainer subclass
    try:
        trainer.train()
    finally:
        trainer.close()
    return time.perf_counter() - start


def oracle(record) -> dict:
    """gqc_dist's own loop on the recorded run's micro-batches: the decisions, the lr each step
    applied, each window's mean loss, the final parameters."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torchtitan_helpers as h
    from gqc_dist.config import build_controller, parse_section
    from gqc_dist.engines import TorchOptimizerGradients

    rank, world = dist.get_rank(), dist.get_world_size()
    model = h.TinyLM(h.TinyLM.Config())
    model.load_state_dict(record["init"])
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    model.set_force_sum_reduction_for_comms(True)  # gloo has no AVG: FSDP2 then divides by the world itself
    optimizer = torch.optim.AdamW(model.parameters(), lr=h.LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, h.lr_factor)
    wrapper, schedule = build_controller(parse_section(record["section"]), optimizer,
                                         gradients=TorchOptimizerGradients(optimizer, clip=h.MAX_NORM),
                                         physical_batch_size=h.LOCAL_BATCH, micro_batch_size=h.LOCAL_BATCH * world)
    decisions, windows, lrs, window_losses, index = [], [], [], [], 0
    for _ in range(h.STEPS):
        losses = []
        while True:
            inputs, labels = h.micro_batch(index, rank)
            index += 1
            logits = model(inputs["input"])
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())  # this rank's token mean
            loss.backward()
            decision = wrapper.after_backward(loss.detach())
            decisions.append(decision.stepped)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            losses.append(global_loss.item() / world)  # the micro-batch's global token mean
            if decision.stepped:
                break
        windows.append(decision.window.num_draws)
        lrs.append(decision.window.lr)
        window_losses.append(sum(losses) / len(losses))
        scheduler.step()
        if schedule is not None:
            schedule.step()
    final = {name: param.full_tensor().detach().clone() for name, param in model.named_parameters()}
    return {"decisions": decisions, "windows": windows, "lrs": lrs, "losses": window_losses, "final": final,
            "num_steps": wrapper.num_steps, "num_batches": wrapper.num_batches}


def refused(*args) -> str:
    """The GQCConfigError a run with ``args`` raises (only ``GQCTrainer.__init__`` knows the
    gradient accumulation torchtitan derives), or ``""``."""
    from gqc_dist.errors import GQCConfigError

    try:
        titan_run(*args)
    except GQCConfigError as error:
        return str(error)
    return ""


def main() -> None:
    apply_cpu_shim()
    import torchtitan_helpers as h

    out = os.environ["GQC_TITAN_OUT"]
    dump = os.path.join(out, "run")
    timings = {"full": titan_run("--dump_folder", dump, "--gradient_quality_control.max_draws", 4)}
    timings["resume"] = titan_run("--dump_folder", dump, "--gradient_quality_control.max_draws", 4,
                                  "--checkpoint.load_step", 2, "--checkpoint.load_only")
    start = time.perf_counter()
    result = {"runs": h.RUNS, "oracle": oracle(h.RUNS[0]), "timings": timings}
    timings["oracle"] = time.perf_counter() - start
    result["refused_accumulation"] = refused("--dump_folder", os.path.join(out, "ga"),
                                             "--training.global_batch_size", 2 * h.LOCAL_BATCH * 2)
    torch.save(result, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    # last: the example through torchtitan's own entry point, torchtitan.train.main, which destroys
    # the process group when it ends (so nothing can run after it)
    from gqc_dist.examples import torchtitan_tiny

    torchtitan_tiny.main(["--training.steps", "4", "--dump_folder", os.path.join(out, "example")])


if __name__ == "__main__":
    main()
