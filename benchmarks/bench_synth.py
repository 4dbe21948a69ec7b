"""Throughput of `cvig-engine synth` on one core at default sizes (256 tile, 128 x 512 panorama).

Prints JSON: seconds to build one city, and pairs per second for rendering alone, rendering plus
PNG writing (without and with the four masks), wall clock and CPU time. The issue's target is
at least 50 panorama-plus-tile pairs per second on one core.

    OMP_NUM_THREADS=1 python benchmarks/bench_synth.py [--pairs 200] [--output results.json]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from cvig_engine.bench import machine_description  # noqa: E402
from cvig_engine.synth import SynthSettings, build_city, render_pairs, write_png  # noqa: E402


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--fov", type=float, default=360.0)
    parser.add_argument("--png-level", type=int, default=1)
    parser.add_argument("--output", type=Path, help="Also write the JSON here.")
    arguments = parser.parse_args()
    settings = SynthSettings(fov=arguments.fov)
    city, build_wall, build_cpu = _timed(lambda: build_city(settings, 0))
    list(render_pairs(city, 5, city_index=0))  # warm caches (geometry, noise bank)

    def render_only():
        for _ in render_pairs(city, arguments.pairs, city_index=0):
            pass

    def render_and_write(masks):
        with tempfile.TemporaryDirectory() as folder:
            for pair in render_pairs(city, arguments.pairs, city_index=0):
                write_png(Path(folder) / "s.png", pair.surface.image, arguments.png_level)
                write_png(Path(folder) / "o.png", pair.overhead.image, arguments.png_level)
                if masks:
                    for index, layer in enumerate(
                        (
                            pair.surface.building,
                            pair.surface.road,
                            pair.overhead.building,
                            pair.overhead.road,
                        )
                    ):
                        write_png(
                            Path(folder) / f"m{index}.png",
                            layer.astype(np.uint8) * 255,
                            arguments.png_level,
                        )

    report = {
        "benchmark": "synth",
        "machine": machine_description(),
        "settings": {
            "tile_size": settings.tile_size,
            "pano": [settings.pano_height, settings.pano_width],
            "fov": settings.fov,
            "city_size_m": settings.city_size,
            "png_level": arguments.png_level,
        },
        "pairs": arguments.pairs,
        "city_build_s": {"wall": round(build_wall, 3), "cpu": round(build_cpu, 3)},
    }
    for name, function in (
        ("render", render_only),
        ("render_write", lambda: render_and_write(False)),
        ("render_write_masks", lambda: render_and_write(True)),
    ):
        _, wall, cpu = _timed(function)
        report[f"{name}_pairs_per_s"] = {
            "wall": round(arguments.pairs / wall, 1),
            "cpu": round(arguments.pairs / cpu, 1),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.output:
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
