#!/bin/sh
# Runs a command with glibc's malloc keeping freed memory in the process, for JAX on a CPU:
# XLA's CPU runtime allocates each call's temporary buffer afresh (about 1 GB for the ViT-T
# training step), and with these settings the next call reuses it instead of page-faulting
# new memory in. One malloc arena for all threads: compiling and small programs get slower.
#
#   ./cpu.sh python train.py --config configs/sameo.py:vitt_cpu --workdir W \
#       --config.init_checkpoint=weights/efficient_sam_vitt.pt
#   ./cpu.sh python benchmarks/run.py
export MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647
exec "$@"
