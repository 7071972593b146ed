"""Runnable examples: ``torchrun --nproc_per_node 4 -m gqc_dist.examples.fsdp2_moe``."""
