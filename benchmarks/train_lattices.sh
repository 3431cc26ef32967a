#!/bin/bash
# Train several lattices side by side on one GPU machine, as done for the shipped lattices:
#   benchmarks/train_lattices.sh OUT_DIR "NAME TRAIN-ARGS..." ["NAME TRAIN-ARGS..." ...]
# e.g. benchmarks/train_lattices.sh out "lq_16_8 --d 8 --D 16 --restarts 4 --max-seconds 400"
# Each job runs `python -m lift_ao.lattice train TRAIN-ARGS --device cuda` (through torch_only.py,
# so torchao need not be installed) and writes OUT_DIR/NAME.safetensors and OUT_DIR/NAME.log.
# One CPU thread per process: with a dozen processes, torch's default of one thread per core
# oversubscribes the CPUs that feed the GPU.
set -u
out=$1; shift
mkdir -p "$out"
here=$(dirname "$0")
for job in "$@"; do
    read -r name args <<<"$job"
    OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 python3 "$here/torch_only.py" train $args --device cuda \
        --out "$out/$name.safetensors" >"$out/$name.log" 2>&1 &
done
wait
