#!/usr/bin/env bash
# Scoring at CVUSA scale on the CPU: 8,884 photos x 8,884 tiles, C16 H4 W64 feature maps, at
# 360 deg (Wg 64) and 70 deg (Wg 13, the DSM rule), on 2 threads; then the results table.
#
#   benchmarks/run_cpu_cvusa.sh                 # THREADS=4 benchmarks/run_cpu_cvusa.sh: 4 threads
#
# Each run also measures the machine's matmul and copy ceilings and times the naive per-shift
# GEMM baseline on 256 queries (extrapolated to 8,884). Run it on a quiet machine: the JSON
# records the load average at the start and the end, but other work slows a run down.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
export OMP_NUM_THREADS="$THREADS"
for GROUND_WIDTH in 64 13; do
    cvig-engine bench score --n 8884 --m 8884 --wg "$GROUND_WIDTH" --device cpu \
        --threads "$THREADS" --no-progress
done
python benchmarks/summarize.py
