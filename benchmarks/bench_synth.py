"""Throughput of `cvig-engine synth` on one core at default sizes (256 tile, 128 x 512 panorama).

Prints JSON with, for one city of ``--pairs`` pairs written through the command's own writer
(``synthesize``): the city's build time, pairs per second rendering alone, and pairs per second
rendering and writing (JPEG photos and tiles, then also the four PNG masks; and PNG images for
comparison). Then the default command end to end (1,000 pairs over 11 cities, city builds
included) unless ``--no-default-run``. The issue's target: at least 50 panorama-plus-tile pairs
per second on one core.

    taskset -c 0 python benchmarks/bench_synth.py [--pairs 300] [--output results.json]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from cvig_engine.bench import machine_description  # noqa: E402
from cvig_engine.synth import SynthSettings, build_city, render_pairs, synthesize  # noqa: E402


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _rate(pairs, seconds):
    return round(pairs / seconds, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--fov", type=float, default=360.0)
    parser.add_argument("--no-default-run", action="store_true")
    parser.add_argument("--output", type=Path, help="Also write the JSON here.")
    arguments = parser.parse_args()
    settings = SynthSettings(pairs=arguments.pairs, cities=1, fov=arguments.fov)
    # Compiles (or loads) the numba loops and warms the geometry and noise caches.
    city = build_city(settings, 0)
    list(render_pairs(city, 5, city_index=0))
    city, build_wall, build_cpu = _timed(lambda: build_city(settings, 0))
    report = {
        "benchmark": "synth",
        "machine": machine_description(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "settings": {
            "tile_size": settings.tile_size,
            "pano": [settings.pano_height, settings.pano_width],
            "fov": settings.fov,
            "city_size_m": settings.city_size,
        },
        "pairs": arguments.pairs,
        "city_build_s": {"wall": round(build_wall, 3), "cpu": round(build_cpu, 3)},
    }
    _, wall, cpu = _timed(lambda: list(render_pairs(city, arguments.pairs, city_index=0)))
    report["render_pairs_per_s"] = {"wall": _rate(arguments.pairs, wall),
                                    "cpu": _rate(arguments.pairs, cpu)}
    variants = (
        ("render_write_jpeg", dict(masks=False), {}),
        ("render_write_jpeg_masks", dict(masks=True), {}),
        ("render_write_png_masks", dict(masks=True), dict(image_format="png")),
    )
    for name, knobs, options in variants:
        with tempfile.TemporaryDirectory() as folder:
            world = SynthSettings(pairs=arguments.pairs, cities=1, fov=arguments.fov, **knobs)
            _, wall, cpu = _timed(lambda: synthesize(folder, world, progress=False, **options))
        # The command builds its city too: take one build off to leave the pairs' own rate.
        report[f"{name}_pairs_per_s"] = {
            "wall": _rate(arguments.pairs, wall - build_wall),
            "cpu": _rate(arguments.pairs, cpu - build_cpu),
        }
    if not arguments.no_default_run:
        with tempfile.TemporaryDirectory() as folder:
            _, wall, cpu = _timed(lambda: synthesize(folder, progress=False))
        defaults = SynthSettings()
        report["default_command"] = {
            "pairs": defaults.pairs,
            "cities": defaults.cities,
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "pairs_per_s_including_city_builds": _rate(defaults.pairs, wall),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.output:
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
