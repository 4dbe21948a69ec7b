"""CPU scoring benchmark at CVUSA scale (8,884 x 8,884, C16 H4 W64), 360 and 70 degrees, checked
against the scoring issue's targets.

    python benchmarks/bench_score_cpu.py                  # full size, 2 threads
    python benchmarks/bench_score_cpu.py --queries 1000   # a quicker look (scaled to CVUSA)

A thin layer over ``cvig_engine.bench.bench_score`` (what ``cvig-engine bench score`` runs): the
library scores correlated synthetic features in a child process (so that its peak RSS is its
own) and times the naive per-shift GEMM baseline on a slice of the queries, extrapolated to all
of them. Each configuration writes its own result JSON naming the machine to
benchmarks/results/, with the targets and whether they were met under ``targets``.
"""
import argparse
from pathlib import Path

from cvig_engine.bench import bench_score, default_result_path, write_result

CVUSA_PAIRS = 8884 * 8884
#: Seconds at CVUSA scale per ground width (360 deg: Wg 64; 70 deg, DSM rule: Wg 13).
TARGET_SECONDS = {64: 30.0, 13: 15.0}
PEAK_RSS_TARGET_BYTES = 2 << 30
SPEEDUP_TARGET_360 = 10.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=8884)
    parser.add_argument("--tiles", type=int, default=8884)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", default=None, help="QxA tile (default: the library's)")
    parser.add_argument("--naive-queries", type=int, default=256)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    arguments = parser.parse_args()
    for ground_width, target_seconds in TARGET_SECONDS.items():
        record = bench_score(arguments.queries, arguments.tiles, ground_width=ground_width,
                             device="cpu", threads=arguments.threads, tile=arguments.tile,
                             naive_queries=arguments.naive_queries)
        engine = record["engine"]
        at_cvusa_scale = engine["seconds"] * CVUSA_PAIRS / (arguments.queries * arguments.tiles)
        targets = {"seconds_at_cvusa_scale": at_cvusa_scale, "target_seconds": target_seconds,
                   "meets_time_target": at_cvusa_scale <= target_seconds,
                   "peak_rss_target_bytes": PEAK_RSS_TARGET_BYTES,
                   "meets_rss_target": engine["peak_rss_bytes"] <= PEAK_RSS_TARGET_BYTES}
        if ground_width == 64:
            targets["speedup_target"] = SPEEDUP_TARGET_360
            targets["meets_speedup_target"] = record["speedup_over_naive"] >= SPEEDUP_TARGET_360
        record["targets"] = targets
        path = write_result(record, default_result_path(record, arguments.results))
        print(f"Wg {ground_width}: {engine['seconds']:.1f} s (CVUSA scale {at_cvusa_scale:.1f} s, "
              f"target {target_seconds:.0f} s), "
              f"peak RSS {engine['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"speed-up over naive {record['speedup_over_naive']:.1f}x, "
              f"top-1 {engine['metrics']['top1']:.1f}%; written {path}", flush=True)


if __name__ == "__main__":
    main()
