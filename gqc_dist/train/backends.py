"""Build the model, optimizer and GQC controller for the engine a gqc-train config names.

One class per engine (:class:`SingleEngine`, :class:`DDPEngine`, :class:`FSDP2Engine`,
:class:`DeepSpeedEngine`), each owning its forward, backward, step and checkpoint files, with the
same small surface, so the training loop and ``run_dir.Checkpoints`` do not know which engine
they drive: ``loss(x, y)``, ``backward(loss)``, ``step(loss) -> bool``, ``controller`` (the GQC
wrapper), ``lr()``, ``threshold()``, ``state_dict()`` / ``load_state_dict()`` and
``save_files(folder)`` / ``load_files(folder)``. A new backend is a subclass. The learning rate
of every step is set by a window hook on the controller (``progress.lr_hook``), the same on every
engine.
"""

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict

import torch
import torch.distributed as dist

from gqc_dist.algorithms.spec import get as algorithm_spec
from gqc_dist.core.session import GQCSession
from gqc_dist.config import build_controller
from gqc_dist.errors import TrainError
from gqc_dist.engines import TorchOptimizerGradients
from gqc_dist.engines.moe import expert_param_groups, expert_parallel_groups, reduce_expert_grads
from gqc_dist.core.packet import world_rank_and_size
from gqc_dist.train.device import autocast, grad_scaler, resolve_device
from gqc_dist.train.progress import Budget, TokenKeyedSchedule, lr_hook
from gqc_dist.train.mpi_env import discover, launched_by_mpi
from gqc_dist.train.slurm_env import first_host
from gqc_dist.train.model import GPT, ModelConfig, block_modules, expert_parameters, token_loss


_LAUNCHER_KEYS = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun, deepspeed launcher, MPI (mpi_env)
                  ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))  # plain srun


def init_distributed(engine: str, timeout_s: float = 300.0, device: str = "auto") -> torch.device:
    """Start torch.distributed (gloo on CPU, nccl on GPU) from the launcher's environment.

    torchrun, the deepspeed launcher and ``srun torchrun`` set ``RANK``/``WORLD_SIZE``; under
    ``mpirun`` (any MPI) rank, world, local rank and the rendezvous come from MPI itself
    (``mpi_env.discover``), under plain ``srun`` from ``SLURM_*``. ``MASTER_ADDR`` defaults to the job's first node under Slurm
    (``slurm_env.first_host``), else 127.0.0.1; ``MASTER_PORT`` to 29500 (under Slurm 15000 + job
    id mod 5000, so two jobs on one node do not collide). Every collective of the process group
    fails after ``timeout_s`` seconds instead of waiting for a stalled rank forever. Engine
    ``single`` under a launcher that started several ranks is refused. Returns this rank's
    device (``train.device.resolve_device``): NCCL on CUDA, gloo on the CPU.
    """
    if dist.is_initialized():
        return resolve_device(device)
    if launched_by_mpi():
        for key, value in discover().items():
            os.environ.setdefault(key, value)
    found = next(((rank, size, local) for rank, size, local in _LAUNCHER_KEYS
                  if rank in os.environ and size in os.environ), None)
    if engine == "single":
        if found and int(os.environ[found[1]]) > 1:
            raise TrainError(f"engine 'single' runs one process, but the launcher started {found[1]}="
                             f"{os.environ[found[1]]} ranks: use --engine ddp, fsdp2 or deepspeed, or launch "
                             "one process")
        return resolve_device(device)
    if found is None:
        raise TrainError(f"engine {engine!r} needs a launcher (torchrun, deepspeed, mpirun or srun): "
                         "no RANK/WORLD_SIZE in the environment")
    rank_key, size_key, local_key = found
    os.environ.setdefault("RANK", os.environ[rank_key])
    os.environ.setdefault("WORLD_SIZE", os.environ[size_key])
    os.environ.setdefault("LOCAL_RANK", os.environ.get(local_key, "0"))
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    os.environ.setdefault("MASTER_ADDR", first_host(nodes) if nodes else "127.0.0.1")
    job = os.environ.get("SLURM_JOB_ID")
    os.environ.setdefault("MASTER_PORT", str(15000 + int(job) % 5000) if job and job.isdigit() else "29500")
    resolved = resolve_device(device)
    # GQC_TRAIN_BACKEND=gloo: gloo on CUDA tensors, for ranks sharing a GPU (NCCL refuses that)
    backend = os.environ.get("GQC_TRAIN_BACKEND") or ("nccl" if resolved.type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's; other launchers: NCCL says it
    if backend == "nccl" and resolved.type == "cuda" and local_world > torch.cuda.device_count():
        fix = ("set GQC_TRAIN_BACKEND=gloo as well" if os.environ.get("GQC_TRAIN_SHARE_GPUS") == "1"
               else "start one rank per GPU")
        raise TrainError(f"{local_world} ranks on this node's {torch.cuda.device_count()} GPU(s), and NCCL refuses "
                         f"two ranks on one GPU: {fix}")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return resolved


class TrainEngine:
    """What the loop drives (the base: one process). ``module`` is the GPT itself,
    ``forward_model`` what forward runs through."""

    name = "single"
    #: checkpoints go through torch.distributed.checkpoint, so a run saved on N ranks resumes on M
    resharding = False

    def __init__(self, module, session, optimizer, algorithm, device, precision, scaler=None, forward_model=None):
        self.module = module
        self.session = session  # the controller and its value schedule, as every front end drives them
        self.controller = session.controller
        self.optimizer = optimizer
        self.spec = algorithm_spec(algorithm)
        self.device = device
        self.precision = precision
        self.scaler = scaler  # fp16 on the torch engines; the GQC wrapper updates it
        self.forward_model = forward_model or module
        self.local_accumulation = self.controller.local_accumulation

    def _forward_context(self):
        """What the forward runs under: autocast (engines that cast parameters themselves: none)."""
        return autocast(self.device, self.precision)

    def loss(self, x, y):
        with self._forward_context():
            return token_loss(self.forward_model(x), y)

    def backward(self, loss) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def after_part(self, fraction: float) -> None:
        """After the backward of the first part of a split micro-batch (the controller's
        ``after_part``)."""
        self.controller.after_part(fraction)

    def step(self, loss) -> bool:
        """One GQC decision after the backward of ``loss`` (this rank's micro-batch loss); on a
        step the threshold schedule advances once (the learning rate is the window hook's)."""
        return self.session.micro_step(loss).stepped

    def lr(self) -> float:
        """The learning rate the last optimizer step was taken with."""
        return self.controller.last_window.lr

    def threshold(self):
        """The algorithm's threshold-like value (its descriptor's ``logged_value``), or ``None``."""
        key = self.spec.logged_value
        return None if key is None else self.optimizer.param_groups[0].get(key)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """This rank's training state at a step boundary (model shards under FSDP2)."""
        state = {"controller": self.controller.state_dict(include_optimizer=not self.resharding)}
        if self.session.schedule is not None:
            state["value_schedule"] = self.session.schedule.state_dict()
        if not self.resharding:
            state["model"] = self.module.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "model" in state:
            self.module.load_state_dict(state["model"])
        self.controller.load_state_dict(state["controller"])
        if self.session.schedule is not None:
            self.session.schedule.load_state_dict(state["value_schedule"])

    def save_files(self, folder: Path) -> None:
        """Write what the engine checkpoints itself under ``folder`` (every rank; before the
        state dicts are written)."""

    def load_files(self, folder: Path) -> None:
        """Read what :meth:`save_files` wrote (before :meth:`load_state_dict`)."""


SingleEngine = TrainEngine


class DDPEngine(TrainEngine):
    """DistributedDataParallel; under local accumulation every forward runs in ``no_sync()`` (DDP
    decides at forward time whether its backward all-reduces)."""

    name = "ddp"

    def _forward_context(self):
        if not self.local_accumulation:
            return super()._forward_context()
        stack = contextlib.ExitStack()
        stack.enter_context(super()._forward_context())
        stack.enter_context(self.forward_model.no_sync())
        return stack


class FSDP2Engine(TrainEngine):
    """``fully_shard``: FSDP2 casts its parameters itself (``MixedPrecisionPolicy``); a dense
    model's checkpoint goes through torch.distributed.checkpoint and reshards."""

    name = "fsdp2"

    def _forward_context(self):
        return contextlib.nullcontext()

    @property
    def resharding(self) -> bool:
        return not expert_parameters(self.module)

    def _sharded_state_dict(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optim": optim}

    def save_files(self, folder: Path) -> None:
        if not self.resharding:
            return
        import torch.distributed.checkpoint as dcp

        from gqc_dist.train.storage import RunFileError, cause_of

        try:
            dcp.save(self._sharded_state_dict(), checkpoint_id=str(folder / "dcp"))
        except dcp.api.CheckpointException as failed:  # raised on every rank alike
            rank, (exc, _) = sorted(failed.failures.items())[0]
            raise RunFileError(f"cannot write checkpoint {folder / 'dcp'} (rank {rank}): "
                               f"{cause_of(exc, folder)}", folder, cause_of(exc, folder)) from None

    def load_files(self, folder: Path) -> None:
        if not self.resharding:
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sharded = self._sharded_state_dict()  # this world's layout, filled in place
        dcp.load(sharded, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=sharded["model"],
                       optim_state_dict=sharded["optim"])


class DeepSpeedEngine(TrainEngine):
    """A ``gqc_dist.frontends.deepspeed`` engine: DeepSpeed casts, backwards and steps (the step is the GQC
    decision, which also advances the value schedule), and its own checkpoint carries everything:
    model, optimizer and the GQC controller with its schedule."""

    name = "deepspeed"

    def __init__(self, ds_engine, optimizer, algorithm, precision):
        super().__init__(ds_engine.module, ds_engine.gqc_session, optimizer, algorithm, ds_engine.device, precision)
        self.ds_engine = ds_engine

    def _forward_context(self):
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        self.ds_engine.backward(loss)

    def after_part(self, fraction: float) -> None:
        self.ds_engine.gqc_after_part(fraction)

    def step(self, loss) -> bool:
        return self.ds_engine.step()

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass  # load_files restored it all

    def save_files(self, folder: Path) -> None:
        self.ds_engine.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load_files(self, folder: Path) -> None:
        self.ds_engine.load_checkpoint(str(folder / "deepspeed"), tag="state")


def build_engine(config: Dict[str, Any], budget: Budget, device: torch.device) -> TrainEngine:
    """Model, optimizer, controller and schedules for ``config['engine']`` on ``device``
    (distributed started); the learning rate and the controller's value schedule follow ``budget``."""
    # the controller's own collective is bounded like the process group's, with its own message
    config = {**config, "gqc": {"timeout_s": config["train"]["collective_timeout_s"], **config["gqc"]}}
    engine = config["engine"]
    model_config = ModelConfig(**config["model"]).validate()
    ep_group = edp_group = None
    if model_config.ep_size > 1:
        ep_group, edp_group = expert_parallel_groups(model_config.ep_size)
    module = GPT(model_config, ep_group=ep_group, seed=config["seed"])
    precision = config["precision"]
    if engine != "deepspeed":  # DeepSpeed places the model itself
        module.to(device)
    opt = config["optimizer"]
    world = world_rank_and_size()[1]
    forward_model = None
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        policy = MixedPrecisionPolicy(param_dtype=cast, reduce_dtype=torch.float32 if cast else None)
        for part in block_modules(module):
            fully_shard(part, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, ignored_params=set(expert_parameters(module)), mp_policy=policy)
        if config["gqc"]["local_accumulation"]:  # the wrapper reduces at its steps
            module.set_requires_gradient_sync(False)
    elif engine == "ddp":
        forward_model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if model_config.num_experts:
        reduce_expert_grads(module, edp_group, world)
        groups = expert_param_groups(module, ep_group)
    else:
        groups = [{"params": list(module.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=opt["lr"], betas=(opt["beta1"], opt["beta2"]),
                                  weight_decay=opt["weight_decay"])
    micro_batch = config["data"]["micro_batch_size"] // world
    if engine == "deepspeed":
        return _deepspeed_engine(config, module, optimizer, micro_batch, budget)
    scaler = grad_scaler(device, precision)
    gradients = TorchOptimizerGradients(optimizer, grad_scaler=scaler, clip=opt["grad_clip"])
    controller, value_schedule = build_controller(config["gqc"], optimizer, physical_batch_size=micro_batch,
                                                  micro_batch_size=config["data"]["micro_batch_size"],
                                                  gradients=gradients,
                                                  window_hook=lr_hook(budget, config["optimizer"]))
    session = GQCSession(controller, _keyed(value_schedule, config, budget, controller))
    classes = {"single": SingleEngine, "ddp": DDPEngine, "fsdp2": FSDP2Engine}
    return classes[engine](module, session, optimizer, config["gqc"]["algorithm"], device,
                           precision, scaler=scaler, forward_model=forward_model)


def _keyed(value_schedule, config, budget, controller):
    """The controller's value schedule, placed by tokens when the run has a token budget."""
    if value_schedule is None or budget.tokens is None:
        return value_schedule
    return TokenKeyedSchedule(value_schedule, config["gqc"]["schedule"]["num_training_steps"], budget, controller)


def _deepspeed_engine(config, module, optimizer, micro_batch, budget) -> TrainEngine:
    from gqc_dist.frontends import deepspeed as gqc_deepspeed

    precision = config["precision"]
    ds_config = {**config["deepspeed"], "train_micro_batch_size_per_gpu": micro_batch,
                 **({"bf16": {"enabled": True}} if precision == "bf16" else {}),
                 **({"fp16": {"enabled": True}} if precision == "fp16" else {}),
                 "gradient_clipping": config["optimizer"]["grad_clip"], "steps_per_print": 10**9,
                 "zero_allow_untested_optimizer": True, "gradient_quality_control": config["gqc"]}
    ds_engine, _, _, _ = gqc_deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    ds_engine.gqc.window_hook = lr_hook(budget, config["optimizer"])
    ds_engine.gqc_session.schedule = _keyed(ds_engine.gqc_session.schedule, config, budget, ds_engine.gqc)
    return DeepSpeedEngine(ds_engine, optimizer, config["gqc"]["algorithm"], precision)
