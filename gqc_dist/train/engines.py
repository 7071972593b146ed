"""Build the model, optimizer and GQC controller for the engine a gqc-train config names.

Every engine returns a :class:`TrainEngine` with the same small surface, so the training loop
does not know which engine it drives: ``loss(x, y)``, ``backward(loss)``, ``step() -> bool``,
``controller`` (the GQC wrapper, for statistics), ``lr()``, and checkpoint state.
"""

import math
import os
from typing import Any, Dict

import torch
import torch.distributed as dist

from ..config import build_controller
from ..engines import TorchOptimizerGradients
from ..moe import expert_param_groups, expert_parallel_groups, reduce_expert_grads
from .model import GPT, ModelConfig, block_modules, expert_parameters


def init_distributed(engine: str) -> None:
    """Start torch.distributed (gloo on CPU, nccl on GPU) from the launcher's environment.

    torchrun, the deepspeed launcher and ``srun torchrun`` set ``RANK``/``WORLD_SIZE``; under
    ``mpirun`` (MPICH ``PMI_*``, Open MPI ``OMPI_COMM_WORLD_*``) or plain ``srun`` (``SLURM_*``)
    they are derived here. ``MASTER_ADDR`` defaults to 127.0.0.1 and ``MASTER_PORT`` to 29500.
    """
    if engine == "single" or dist.is_initialized():
        return
    for rank_key, size_key, local_key in (("RANK", "WORLD_SIZE", "LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                                          ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                           "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank_key in os.environ and size_key in os.environ:
            os.environ.setdefault("RANK", os.environ[rank_key])
            os.environ.setdefault("WORLD_SIZE", os.environ[size_key])
            os.environ.setdefault("LOCAL_RANK", os.environ.get(local_key, "0"))
            break
    else:
        raise RuntimeError(f"engine {engine!r} needs a launcher (torchrun, deepspeed, mpirun or srun): "
                           "no RANK/WORLD_SIZE in the environment")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0.1 at ``total`` optimizer steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class TrainEngine:
    """What the loop drives. ``forward_model`` is what forward runs through (DDP/FSDP2 wrappers
    included); ``module`` is the GPT itself."""

    def __init__(self, name, module, controller, value_schedule, lr_schedule, optimizer,
                 forward_model=None, ds_engine=None):
        self.name = name
        self.module = module
        self.controller = controller
        self.value_schedule = value_schedule
        self.lr_schedule = lr_schedule
        self.optimizer = optimizer
        self.forward_model = forward_model or module
        self.ds_engine = ds_engine

    def loss(self, x, y):
        if self.forward_model is self.module or self.name == "fsdp2":
            return self.module.loss(x, y)
        logits = self.forward_model(x)  # DDP's forward hooks must run
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def backward(self, loss) -> None:
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
        else:
            loss.backward()

    def step(self) -> bool:
        """One GQC decision; on a step the lr and threshold schedules advance once."""
        if self.ds_engine is not None:
            return self.ds_engine.step()  # DeepSpeed steps its lr scheduler and the value schedule
        stepped = self.controller.step()
        if stepped:
            self.lr_schedule.step()
            if self.value_schedule is not None:
                self.value_schedule.step()
        return stepped

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> Dict[str, Any]:
        """This rank's training state at a step boundary (model shards under FSDP2)."""
        state = {"controller": self.controller.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}
        if self.value_schedule is not None:
            state["value_schedule"] = self.value_schedule.state_dict()
        if self.ds_engine is None:
            state["model"] = self.module.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.ds_engine is None:
            self.module.load_state_dict(state["model"])
        self.controller.load_state_dict(state["controller"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.value_schedule is not None:
            self.value_schedule.load_state_dict(state["value_schedule"])


def build_engine(config: Dict[str, Any]) -> TrainEngine:
    """Model, optimizer, controller and schedules for ``config['engine']`` (distributed started)."""
    engine = config["engine"]
    model_config = ModelConfig(**config["model"]).validate()
    ep_group = edp_group = None
    if model_config.ep_size > 1:
        ep_group, edp_group = expert_parallel_groups(model_config.ep_size)
    module = GPT(model_config, ep_group=ep_group, seed=config["seed"])
    opt = config["optimizer"]
    world = dist.get_world_size() if dist.is_initialized() else 1
    forward_model = None
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
        for part in block_modules(module):
            fully_shard(part, mesh=mesh)
        fully_shard(module, mesh=mesh, ignored_params=set(expert_parameters(module)))
    elif engine == "ddp":
        forward_model = torch.nn.parallel.DistributedDataParallel(module)
    if model_config.num_experts:
        reduce_expert_grads(module, edp_group, world)
        groups = expert_param_groups(module, ep_group)
    else:
        groups = [{"params": list(module.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=opt["lr"], betas=(opt["beta1"], opt["beta2"]),
                                  weight_decay=opt["weight_decay"])
    total = config["train"]["optimizer_steps"]
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, opt["warmup_steps"], total))
    micro_batch = config["data"]["micro_batch_size"] // world
    if engine == "deepspeed":
        return _deepspeed_engine(config, module, optimizer, lr_schedule, micro_batch)
    gradients = TorchOptimizerGradients(optimizer, clip=opt["grad_clip"])
    controller, value_schedule = build_controller(config["gqc"], optimizer,
                                                  physical_batch_size=micro_batch, gradients=gradients)
    return TrainEngine(engine, module, controller, value_schedule, lr_schedule, optimizer, forward_model)


def _deepspeed_engine(config, module, optimizer, lr_schedule, micro_batch) -> TrainEngine:
    from .. import deepspeed as gqc_deepspeed

    ds_config = {**config["deepspeed"], "train_micro_batch_size_per_gpu": micro_batch,
                 "gradient_clipping": config["optimizer"]["grad_clip"], "steps_per_print": 10**9,
                 "zero_allow_untested_optimizer": True, "gradient_quality_control": config["gqc"]}
    ds_engine, _, _, _ = gqc_deepspeed.initialize(model=module, optimizer=optimizer,
                                                  lr_scheduler=lr_schedule, config=ds_config)
    return TrainEngine("deepspeed", ds_engine.module, ds_engine.gqc, ds_engine.gqc_schedule,
                       lr_schedule, optimizer, ds_engine=ds_engine)
