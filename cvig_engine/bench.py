"""Benchmarks: encoder latency, all-pairs scoring throughput, and the pipeline end to end.

    from cvig_engine.bench import bench_score, write_result
    record = bench_score(8884, 8884, ground_width=64, device="cpu")
    write_result(record)            # benchmarks/results/score_<host>_<date>.json

Every result is one JSON document with ``kind`` ("encode", "score" or "e2e"), ``created`` (UTC),
``machine`` (``machine_description``: CPU model, cores, memory, GPU, driver and library versions,
the load average when the run started) and ``load_average_end``. ``results_markdown`` turns a
folder of them into the tables of ``benchmarks/RESULTS.md``.

``bench_score`` runs the library's scorer and the naive baseline (one GEMM per shift over the
whole window, a running first argmax, no tiling) each in a child process, so that each one's
peak resident memory is its own; the naive baseline is timed on a slice of the queries and
extrapolated linearly when the slice is not all of them (``naive.extrapolated`` says which).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError, CvigMissingDependency
from cvig_engine.files import atomic_write_json

__all__ = ["RESULT_KINDS", "RESULTS_FOLDER", "machine_description", "default_result_path",
           "write_result", "measure_ceilings", "synthetic_feature_store",
           "naive_per_shift_distances", "bench_score", "bench_encode", "bench_e2e",
           "load_results", "results_markdown"]

RESULT_KINDS = ("score", "encode", "e2e")
#: Default folder of result files, relative to the working directory (the repository root).
RESULTS_FOLDER = Path("benchmarks") / "results"
RESULT_FORMAT_VERSION = 1
#: The scoring benchmark's feature maps: C16 H4 W64 (the model's aerial map).
SCORE_CHANNELS, SCORE_HEIGHT, SCORE_WIDTH = 16, 4, 64
_GENERATE_ROWS = 4096  # feature rows generated at a time (bounded temporaries)
_LOW_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}


# -- the machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_bytes() -> dict:
    """MemTotal and MemAvailable from /proc/meminfo (empty where there is none)."""
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"total_bytes": values.get("MemTotal"),
            "available_bytes_at_start": values.get("MemAvailable")}


def _nvidia_driver_version() -> str | None:
    if shutil.which("nvidia-smi"):
        try:
            output = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=20, check=True).stdout.strip()
            if output:
                return output.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module\s+([0-9.]+)", text)
        return match.group(1) if match else None
    except OSError:
        return None


def _gpu_description() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return {"name": properties.name, "count": torch.cuda.device_count(),
            "compute_capability": f"{properties.major}.{properties.minor}",
            "memory_bytes": int(properties.total_memory),
            "multiprocessors": int(properties.multi_processor_count),
            "driver": _nvidia_driver_version(), "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def _versions() -> dict:
    import importlib.util

    from cvig_engine.export import library_versions

    versions = library_versions(tensorrt=True)
    for name in ("cupy", "h5py", "scipy"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            versions[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception as error:  # a broken optional install is worth recording, not fatal
            versions[name] = f"not importable ({type(error).__name__}: {error})"
    return versions


def machine_description() -> dict:
    """What ran a benchmark: host, CPU, cores, memory, GPU, driver, library versions, load.

    The load average is taken first, before anything this function imports adds to it: the
    machine may be shared, and the numbers mean little without it.
    """
    load = os.getloadavg()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_model": _cpu_model(),
            "logical_cores": os.cpu_count(), "cores_available": affinity,
            "memory": _memory_bytes(), "gpu": _gpu_description(), "versions": _versions(),
            "load_average_1min_at_start": load[0], "load_average_at_start": list(load)}


def _new_record(kind: str, settings: dict) -> dict:
    return {"kind": kind, "format_version": RESULT_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(), "settings": settings}


def _finish_record(record: dict) -> dict:
    record["load_average_end"] = list(os.getloadavg())
    return record


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def default_result_path(record: dict, folder=None) -> Path:
    """``<folder>/<kind>_<gpu name or host>_<UTC date-time>.json`` for a result record."""
    machine = record["machine"]
    used_gpu = str(record.get("settings", {}).get("device", "")).startswith("cuda")
    who = machine["gpu"]["name"] if used_gpu and machine.get("gpu") else machine["hostname"]
    stamp = record["created"][:19].replace("-", "").replace(":", "").replace("T", "-")
    return Path(folder or RESULTS_FOLDER) / f"{record['kind']}_{_slug(who)}_{stamp}.json"


def write_result(record: dict, out=None) -> Path:
    """Write a result record as JSON to ``out`` (default: ``default_result_path``)."""
    path = Path(out) if out else default_result_path(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path


# -- ceilings and timing helpers ----------------------------------------------------------------


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CvigInputError(f"--device {device}: no CUDA GPU is available "
                             "(torch.cuda.is_available() is False); use --device cpu")
    if device != "cpu" and not str(device).startswith("cuda"):
        raise CvigInputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def _synchronize(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _best_seconds(function, repeats: int, device) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call, device-synchronised."""
    function()
    _synchronize(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        function()
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


class _MatmulPrecision:
    """Context: CUDA float32 matmuls in TF32 or not, restored afterwards."""

    def __init__(self, tf32: bool):
        self.tf32 = tf32

    def __enter__(self):
        import torch

        self.previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32

    def __exit__(self, *exc_info):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = self.previous


def measure_ceilings(device: str = "cpu", *, precision: str = "fp32",
                     matmul_size: int | None = None, copy_mib: int | None = None,
                     repeats: int = 5) -> dict:
    """The machine's measured ceilings on a device: a large square matmul and a large copy.

    Args:
        device: "cpu", "cuda" or "cuda:N".
        precision: the matmul's inputs: "fp32" (IEEE; on CUDA no TF32), "tf32", "bf16", "fp16".
        matmul_size: side of the square matrices (default 2048 on CPU, 8192 on CUDA).
        copy_mib: size of the copied buffer (default 256 MiB on CPU, 2048 MiB on CUDA).
        repeats: timed repeats after a warm-up; the fastest counts.

    Returns:
        matmul_tflops (2 n^3 / seconds), copy_gb_per_s (bytes read + written / seconds), and the
        sizes and seconds behind them.
    """
    import torch

    on_cuda = str(device).startswith("cuda")
    size = int(matmul_size or (8192 if on_cuda else 2048))
    mebibytes = int(copy_mib or (2048 if on_cuda else 256))
    dtype = getattr(torch, _LOW_PRECISION.get(precision, "float32"))
    generator = torch.Generator(device="cpu").manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    product = torch.empty(size, size, device=device, dtype=dtype)
    with _MatmulPrecision(precision == "tf32"):
        matmul_seconds = _best_seconds(lambda: torch.mm(left, right, out=product), repeats, device)
    del left, right, product
    source = torch.ones(mebibytes * (1 << 20) // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_seconds = _best_seconds(lambda: target.copy_(source), repeats, device)
    copied = 2 * source.numel() * source.element_size()
    del source, target
    if on_cuda:
        torch.cuda.empty_cache()  # give the memory back before the benchmark's children run
    return {"device": str(device), "precision": precision,
            "matmul_size": size, "matmul_seconds": matmul_seconds,
            "matmul_tflops": 2.0 * size ** 3 / matmul_seconds / 1e12,
            "copy_bytes_read_and_written": copied, "copy_seconds": copy_seconds,
            "copy_gb_per_s": copied / copy_seconds / 1e9,
            "torch_threads": torch.get_num_threads() if not on_cuda else None}


# -- the scoring benchmark --------------------------------------------------------------------


def synthetic_feature_store(path, num_queries: int, num_tiles: int, ground_width: int, *,
                            seed: int = 0, channels: int = SCORE_CHANNELS,
                            height: int = SCORE_HEIGHT, aerial_width: int = SCORE_WIDTH) -> Path:
    """A feature store of seeded, correlated random features, as embedded maps would be.

    Aerial maps are standard normal. Query n's true tile is n mod M; its map is that tile's
    window at a random shift plus Gaussian noise whose level varies per query (uniform up to
    0.6 sqrt(C H Wg) times the signal's), so the true tiles' ranks spread from 1 to M.
    """
    from cvig_engine.polar import shift_to_heading
    from cvig_engine.store import write_feature_store

    rng = np.random.default_rng(seed)
    aerial = rng.standard_normal((num_tiles, channels, height, aerial_width), dtype=np.float32)
    match = np.arange(num_queries) % num_tiles
    shifts = rng.integers(0, aerial_width, num_queries)
    noise_scale = 0.6 * np.sqrt(channels * height * ground_width)
    ground = np.empty((num_queries, channels, height, ground_width), dtype=np.float32)
    for start in range(0, num_queries, _GENERATE_ROWS):
        stop = min(start + _GENERATE_ROWS, num_queries)
        columns = (shifts[start:stop, None] + np.arange(ground_width)[None, :]) % aerial_width
        window = np.take_along_axis(aerial[match[start:stop]], columns[:, None, None, :], axis=3)
        levels = rng.uniform(0.0, noise_scale, (stop - start, 1, 1, 1)).astype(np.float32)
        noise = rng.standard_normal(window.shape, dtype=np.float32)
        ground[start:stop] = window + levels * noise
    fov = 360.0 * ground_width / aerial_width
    heading = shift_to_heading(shifts, fov, aerial_width)
    return write_feature_store(path, ground_features=ground, aerial_features=aerial, match=match,
                               heading=heading.astype(np.float32),
                               attrs={"fov_deg": fov, "city": "synthetic-benchmark"})


def naive_per_shift_distances(ground, aerial, *, precision: str = "fp32"):
    """The naive baseline: one GEMM per shift over the whole window, a running first argmax.

    No tiling of either side, no spectral trick: for each of the W shifts the ground maps are
    multiplied by every tile's window at that shift, and the running maximum keeps the first
    (strict ``>``). Distances d = 2 - 2 corr[o*] / sqrt(E[m, o*]) as in the library.

    Args:
        ground: [n, C, H, Wg] torch tensor (on the device to run on).
        aerial: [M, C, H, W] torch tensor on the same device (same H: no vertical search).
        precision: "fp32", or on CUDA "tf32", "bf16", "fp16" GEMM inputs.

    Returns:
        (distance float32 [n, M], shift int64 [n, M]).
    """
    import torch

    from cvig_engine.scoring.geometry import ENERGY_FLOOR

    count, ground_width = ground.shape[0], ground.shape[-1]
    width = aerial.shape[-1]
    if aerial.shape[2] != ground.shape[2]:
        raise CvigInputError("the naive baseline has no vertical search: ground and aerial maps "
                             f"must have the same height (got {ground.shape[2]} and "
                             f"{aerial.shape[2]})")
    low = getattr(torch, _LOW_PRECISION[precision]) if precision in _LOW_PRECISION else None
    flat = ground.float().flatten(1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(ENERGY_FLOOR)
    left = flat.to(low) if low is not None else flat
    best = torch.full((count, aerial.shape[0]), -torch.inf, device=ground.device)
    shift = torch.zeros(best.shape, dtype=torch.int64, device=ground.device)
    offsets = torch.arange(ground_width, device=ground.device)
    aerial = aerial.float()
    with _MatmulPrecision(precision == "tf32"):
        for o in range(width):
            window = aerial[..., (offsets + o) % width].flatten(1)  # [M, C*H*Wg]
            correlation = left @ (window.to(low) if low is not None else window).T
            correlation = correlation.float()
            greater = correlation > best  # strict: the first maximum wins
            best = torch.where(greater, correlation, best)
            shift.masked_fill_(greater, o)
    squares = aerial.square().sum(dim=(1, 2))  # [M, W]
    energy = sum(torch.roll(squares, -k, dims=1) for k in range(ground_width))  # window at o
    selected = energy.gather(1, shift.T).T.clamp_min(ENERGY_FLOOR)
    return 2.0 - 2.0 * best / selected.sqrt(), shift


def _set_threads(threads) -> int:
    """Set torch's intra-op threads (None: unchanged); return the previous count."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    return previous


def _gpu_memory(device) -> dict:
    """Peak GPU memory of this process: torch's allocator, and CuPy's pool when CuPy ran."""
    if not str(device).startswith("cuda"):
        return {}
    import torch

    memory = {"torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
              "torch_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}
    if "cupy" in sys.modules:  # the fused kernel allocates through CuPy's pool (it keeps blocks)
        memory["cupy_pool_bytes"] = int(sys.modules["cupy"].get_default_memory_pool().total_bytes())
    free, total = torch.cuda.mem_get_info(device)
    memory["device_used_bytes_at_end"] = int(total - free)  # all processes on the GPU
    return memory


def _child_score(features, output, device, tile, algorithm, precision, topk, ties, threads,
                 use_kernel, progress) -> dict:
    """In the child: the library's scorer, timed; its summary and GPU memory."""
    _set_threads(threads)
    from cvig_engine.scoring import score_feature_store

    started = time.perf_counter()
    summary = score_feature_store(features, output, topk=topk, device=device, tile=tile,
                                  ties=ties, precision=precision, algorithm=algorithm,
                                  overwrite=True, progress=progress, use_kernel=use_kernel)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["gpu_memory"] = _gpu_memory(device)
    return summary


def _child_naive(features, device, precision, queries, ties, threads) -> dict:
    """In the child: the naive baseline on the first ``queries`` queries, timed, and its ranks."""
    import torch

    from cvig_engine.store import open_feature_store

    _set_threads(threads)
    with open_feature_store(features, check_values=False) as store:
        ground = torch.from_numpy(store.ground_features(0, queries)).to(device)
        aerial = torch.from_numpy(store.aerial_features()).to(device)
        match = store.match[:queries]
    naive_per_shift_distances(ground[:2], aerial[:2], precision=precision)  # library warm-up
    _synchronize(device)
    started = time.perf_counter()
    distance, _ = naive_per_shift_distances(ground, aerial, precision=precision)
    _synchronize(device)
    seconds = time.perf_counter() - started
    distance = distance.cpu().numpy()
    true = distance[np.arange(len(match)), match][:, None]
    ranks = ((distance <= true).sum(axis=1) if ties == "pessimistic"
             else 1 + (distance < true).sum(axis=1))
    return {"seconds": seconds, "queries": int(len(match)), "ranks": ranks.tolist(),
            "gpu_memory": _gpu_memory(device)}


_CHILD_FUNCTIONS = {"score": _child_score, "naive": _child_naive}


def _peak_rss_bytes() -> int:
    """This process's peak resident memory.

    VmHWM of /proc/self/status: the high-water mark of the process's own memory map since exec.
    (getrusage's ru_maxrss also counts what the parent held at fork time, which is not ours.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _run_child(name: str, arguments: dict) -> dict:
    """Run ``_CHILD_FUNCTIONS[name](**arguments)`` in a new Python; its result and peak RSS."""
    command = [sys.executable, "-m", "cvig_engine.bench", name, json.dumps(arguments)]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"the benchmark's {name} child process failed (exit status "
                           f"{completed.returncode}); its error is printed above")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _intermediate_bytes_per_pair(geometry, kernel: str) -> int | None:
    """Estimated bytes of tile intermediates written and read per pair by the tile path.

    Products (R floats), correlations or even/odd halves (about 2 V W floats) and distance and
    masks (8 floats) per pair, as in ``estimate_memory_bytes``, each written once and read once;
    with the CPU's FFT epilogue only the products, the distance, the shift and the near-tie flag.
    None for the fused CUDA kernel, which keeps them on chip.
    """
    from cvig_engine.scoring.geometry import SpectralLayout

    if kernel.startswith("cupy"):
        return None
    rows = SpectralLayout(geometry.aerial_width).num_rows if "spectral" in kernel else 0
    if _uses_inverse_fft(geometry, kernel):
        return 2 * (4 * rows + 4 + 2 + 1)
    return 2 * 4 * (rows + 2 * geometry.shifts + 8)


def _uses_inverse_fft(geometry, kernel: str) -> bool:
    """Whether the CPU spectral path inverts with the FFT epilogue (``TileScorer``'s rule)."""
    if kernel != "cpu-spectral":
        return False
    from cvig_engine.scoring.inverse_fft import applies_to

    return applies_to(geometry, "cpu")


def _check_score_options(num_queries, num_tiles, ground_width, device, algorithm, precision,
                         naive_queries):
    from cvig_engine.scoring import ALGORITHMS
    from cvig_engine.scoring.tiles import PRECISIONS

    for name, value in (("--n", num_queries), ("--m", num_tiles)):
        if int(value) < 1:
            raise CvigInputError(f"{name} must be at least 1, got {value}")
    if not 1 <= int(ground_width) <= SCORE_WIDTH:
        raise CvigInputError(f"--wg must be in 1..{SCORE_WIDTH} (the aerial map's width), "
                             f"got {ground_width}")
    if algorithm not in ALGORITHMS:
        raise CvigInputError(f"--algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    if precision not in PRECISIONS:
        raise CvigInputError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if device == "cpu" and precision != "fp32":
        raise CvigInputError(f"--precision {precision} needs a CUDA GPU; the CPU path is fp32")
    if naive_queries is not None and int(naive_queries) < 1:
        raise CvigInputError(f"--naive-queries must be at least 1, got {naive_queries}")


def bench_score(num_queries: int, num_tiles: int, *, ground_width: int = 64, device: str = "auto",
                algorithm: str = "auto", precision: str = "fp32", tile=None, topk: int = 10,
                ties: str = "pessimistic", threads: int | None = None,
                naive_queries: int | None = None, seed: int = 0, use_kernel: bool = True,
                ceiling_matmul_size: int | None = None, ceiling_copy_mib: int | None = None,
                work_dir=None, progress: bool = True) -> dict:
    """Time all-pairs scoring of N x M random features against the naive per-shift GEMM.

    Args:
        num_queries, num_tiles: N ground maps and M aerial maps (C16 H4, aerial W64).
        ground_width: Wg, the ground map's width (64 at 360 deg, 12 or 13 at 70 deg).
        device: "auto", "cpu", "cuda" or "cuda:N" (scorer, baseline and ceilings alike).
        algorithm, precision, tile, topk, ties, use_kernel: passed to ``score_feature_store``.
        threads: torch threads for the scorer, the baseline and the CPU ceilings (None: torch's).
        naive_queries: queries the baseline is timed on (default 256 on CPU, 2048 on CUDA, at
            most N); fewer than N are extrapolated to N linearly.
        seed: seed of the random features.
        ceiling_matmul_size, ceiling_copy_mib: sizes for ``measure_ceilings``.
        work_dir: where the temporary feature store and scores go (default: the system's).

    Returns:
        The result record (kind "score"): ``engine`` (seconds, pairs per second, TFLOP/s counted
        by the direct method's FLOPs and by the algorithm's own, fractions of the ceilings, peak
        RSS and GPU memory), ``naive`` (the same for the baseline, and how often its ranks agree
        with the engine's), ``speedup_over_naive`` and ``ceilings``.
    """
    from cvig_engine.scoring import parse_tile
    from cvig_engine.scoring.geometry import Geometry, choose_algorithm, flops_per_pair

    device = _resolve_device(device)
    _check_score_options(num_queries, num_tiles, ground_width, device, algorithm, precision,
                         naive_queries)
    tile = parse_tile(tile)
    geometry = Geometry(SCORE_CHANNELS, SCORE_HEIGHT, int(ground_width), SCORE_HEIGHT, SCORE_WIDTH)
    if algorithm == "auto":
        algorithm = choose_algorithm(geometry)
    on_cuda = device.startswith("cuda")
    naive_queries = min(int(naive_queries or (2048 if on_cuda else 256)), int(num_queries))
    settings = {"num_queries": int(num_queries), "num_tiles": int(num_tiles),
                "channels": SCORE_CHANNELS, "ground_height": SCORE_HEIGHT,
                "ground_width": int(ground_width), "aerial_height": SCORE_HEIGHT,
                "aerial_width": SCORE_WIDTH, "device": device, "algorithm": algorithm,
                "precision": precision, "tile": list(tile) if tile else None, "topk": int(topk),
                "ties": ties, "threads": threads, "naive_queries": naive_queries, "seed": seed,
                "use_kernel": bool(use_kernel), "features": "synthetic_feature_store (correlated)"}
    record = _new_record("score", settings)
    previous_threads = _set_threads(threads)
    try:
        record["ceilings"] = measure_ceilings(device, precision=precision,
                                              matmul_size=ceiling_matmul_size,
                                              copy_mib=ceiling_copy_mib)
    finally:
        _set_threads(previous_threads)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cvig-bench-", dir=work_dir) as folder:
        features = synthetic_feature_store(Path(folder) / "features.h5", num_queries, num_tiles,
                                           ground_width, seed=seed)
        scores = Path(folder) / "scores.h5"
        summary = _run_child("score", dict(
            features=str(features), output=str(scores), device=device, tile=settings["tile"],
            algorithm=algorithm, precision=precision, topk=topk, ties=ties, threads=threads,
            use_kernel=use_kernel, progress=progress))
        naive = _run_child("naive", dict(
            features=str(features), device=device, precision=precision, queries=naive_queries,
            ties=ties, threads=threads))
        import h5py

        with h5py.File(scores, "r") as handle:
            engine_ranks = handle["rank"][:naive_queries]
    pairs = int(num_queries) * int(num_tiles)
    kernel = summary["kernel"]
    own_algorithm = "spectral" if kernel.startswith("cupy") else algorithm
    direct_flops = flops_per_pair(geometry, "direct") * pairs
    inverse_fft = _uses_inverse_fft(geometry, kernel)
    own_flops = flops_per_pair(geometry, own_algorithm, inverse_fft=inverse_fft) * pairs
    seconds = float(summary["elapsed_seconds"])
    ceilings = record["ceilings"]
    bytes_per_pair = _intermediate_bytes_per_pair(geometry, kernel)
    record["engine"] = {
        "kernel": kernel, "algorithm": own_algorithm, "seconds": seconds,
        "child_wall_seconds": summary["wall_seconds"],
        "pairs_per_second": pairs / seconds,
        "flops_per_pair_direct": flops_per_pair(geometry, "direct"),
        "flops_per_pair_algorithm": flops_per_pair(geometry, own_algorithm,
                                                   inverse_fft=inverse_fft),
        "tflops_direct_count": direct_flops / seconds / 1e12,
        "tflops_algorithm_count": own_flops / seconds / 1e12,
        "fraction_of_matmul_ceiling": own_flops / seconds / 1e12 / ceilings["matmul_tflops"],
        "fraction_of_matmul_ceiling_direct_count":
            direct_flops / seconds / 1e12 / ceilings["matmul_tflops"],
        "intermediate_bytes_per_pair_estimate": bytes_per_pair,
        "fraction_of_copy_bandwidth_estimate":
            None if bytes_per_pair is None
            else bytes_per_pair * pairs / seconds / 1e9 / ceilings["copy_gb_per_s"],
        "peak_rss_bytes": summary["peak_rss_bytes"], "gpu_memory": summary["gpu_memory"],
        "refined_pairs": summary["refined_pairs"], "metrics": summary["metrics"],
        "kernel_fallback_reason": summary.get("kernel_fallback_reason"),
        "timing_covers": "the whole score_feature_store call: opening and hashing the store, "
                         "float64 true pairs, ranks, top-K, writing SCORES.h5"}
    scale = int(num_queries) / naive["queries"]
    naive_seconds = naive["seconds"] * scale
    naive_ranks = np.asarray(naive["ranks"])
    record["naive"] = {
        "method": "one GEMM per shift over the whole window, running first argmax, no tiling "
                  "(distances only: no ranks, top-K or file writes are timed)",
        "precision": precision, "queries_timed": naive["queries"],
        "seconds_timed": naive["seconds"], "extrapolated": naive["queries"] < int(num_queries),
        "seconds": naive_seconds, "pairs_per_second": pairs / naive_seconds,
        "tflops": direct_flops / naive_seconds / 1e12,
        "fraction_of_matmul_ceiling":
            direct_flops / naive_seconds / 1e12 / ceilings["matmul_tflops"],
        "peak_rss_bytes": naive["peak_rss_bytes"], "gpu_memory": naive["gpu_memory"],
        "rank_agreement": float(np.mean(naive_ranks == engine_ranks)),
        "rank_agreement_note": "share of the timed queries whose float32 naive rank equals the "
                               "engine's (float64 near-tie refined) rank"}
    record["speedup_over_naive"] = naive_seconds / seconds
    return _finish_record(record)


# -- the encoder benchmark --------------------------------------------------------------------


def _percentiles_ms(seconds: list[float]) -> dict:
    values = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()),
            "min": float(values.min()), "max": float(values.max())}


def _time_role(backend, role: str, batch: int, warmup: int, repeats: int, rng) -> dict:
    import torch

    from cvig_engine.export import input_shape

    shape = [batch] + input_shape(backend.config, role, backend.aerial_input_kind)
    inputs = rng.standard_normal(shape).astype(np.float32)
    on_cuda = str(backend.device).startswith("cuda")
    # torch and TensorRT take device tensors; onnxruntime takes host arrays (as embed gives them)
    input_on_device = on_cuda and backend.name in ("torch", "tensorrt")
    if input_on_device:
        inputs = torch.from_numpy(inputs).to(backend.device)
    encode = backend.encode_ground if role == "ground" else backend.encode_aerial
    for _ in range(warmup):
        encode(inputs)
    latencies = []
    for _ in range(repeats):
        _synchronize(backend.device)
        started = time.perf_counter()
        encode(inputs)  # returns host numpy: the copy back is part of the latency
        _synchronize(backend.device)
        latencies.append(time.perf_counter() - started)
    latency = _percentiles_ms(latencies)
    return {"input_shape": shape, "input_on_device": input_on_device, "latency_ms": latency,
            "images_per_second": batch / (latency["p50"] / 1e3)}


def _encode_candidates(backends, device: str) -> list[tuple[str, str]]:
    from cvig_engine.backends import BACKEND_NAMES, auto_candidates

    if not backends:
        return auto_candidates(device)
    unknown = sorted(set(backends) - set(BACKEND_NAMES))
    if unknown:
        raise CvigInputError(f"unknown backend {unknown}: use {', '.join(BACKEND_NAMES)}")
    return [(name, "cuda" if name == "tensorrt" and device == "cpu" else device)
            for name in dict.fromkeys(backends)]


def _time_backends(model_dir, candidates, precisions, *, batch, warmup, repeats, seed, threads,
                   cuda_graphs) -> tuple[list, list]:
    """Time both encoders on each (backend, device) and precision: (runs, skipped)."""
    import torch

    from cvig_engine.backends import open_backend

    runs, skipped = [], []
    for name, backend_device in candidates:
        for precision in precisions:
            options = {}
            if name == "onnxruntime" and threads:
                options["threads"] = threads
            if name == "torch" and cuda_graphs is not None and backend_device.startswith("cuda"):
                options["cuda_graphs"] = cuda_graphs
            on_cuda = backend_device.startswith("cuda")
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(backend_device)
            try:
                backend = open_backend(model_dir, backend=name, device=backend_device,
                                       precision=precision, strict=name == "onnxruntime",
                                       batch_size=batch, **options)
            except (CvigMissingDependency, CvigInputError, RuntimeError) as error:
                skipped.append({"backend": name, "device": backend_device, "precision": precision,
                                "reason": f"{type(error).__name__}: {error}"})
                continue
            rng = np.random.default_rng(seed)
            with backend:
                roles = {role: _time_role(backend, role, batch, warmup, repeats, rng)
                         for role in ("ground", "aerial")}
                runs.append({"backend": name, "device": backend_device, "precision": precision,
                             "description": backend.describe(), "roles": roles,
                             "gpu_memory": _gpu_memory(backend_device)})
    return runs, skipped


def bench_encode(model_dir, *, backends=None, device: str = "auto", precisions=("fp32",),
                 batch: int = 8, warmup: int = 3, repeats: int = 20, seed: int = 0,
                 threads: int | None = None, cuda_graphs: bool | None = None) -> dict:
    """Latency percentiles and images per second of both encoders, per backend and precision.

    Args:
        model_dir: an exported MODEL_DIR (``cvig-engine export``).
        backends: names among torch, onnxruntime, tensorrt (default: every one that
            ``backend="auto"`` would consider on the device, fastest first).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        precisions: "fp32", "fp16", "bf16" (each needs its export for onnxruntime).
        batch: images per call (also the backends' fixed batch: CUDA graphs on torch CUDA).
        warmup, repeats: untimed calls first, then timed calls (device-synchronised).
        seed: seed of the random (preprocessed) inputs.
        threads: torch intra-op threads and onnxruntime threads on the CPU (None: defaults).
        cuda_graphs: the torch backend's CUDA graphs (None: its default, on with a fixed batch).

    Returns:
        The result record (kind "encode"): ``runs`` (one per backend and precision that opened:
        its description and, per role, latency p50/p95/p99 in ms and images per second, plus
        peak GPU memory) and ``skipped`` (those that did not open, with the reason).
    """
    from cvig_engine.export import read_manifest

    if batch < 1 or repeats < 1 or warmup < 0:
        raise CvigInputError(f"--batch and --repeats must be positive and --warmup not negative "
                             f"(got {batch}, {repeats}, {warmup})")
    manifest = read_manifest(model_dir, verify=True)
    device = _resolve_device(device)
    precisions = list(dict.fromkeys(precisions or ("fp32",)))
    settings = {"model_dir": str(model_dir), "model_sha256": manifest["model_sha256"],
                "model_config": manifest["config"], "device": device, "batch": batch,
                "warmup": warmup, "repeats": repeats, "precisions": precisions,
                "backends": list(backends) if backends else "every available", "seed": seed,
                "threads": threads, "cuda_graphs": cuda_graphs}
    record = _new_record("encode", settings)
    previous_threads = _set_threads(threads)
    try:
        runs, skipped = _time_backends(model_dir, _encode_candidates(backends, device), precisions,
                                       batch=batch, warmup=warmup, repeats=repeats, seed=seed,
                                       threads=threads, cuda_graphs=cuda_graphs)
    finally:
        _set_threads(previous_threads)
    if not runs:
        reasons = "; ".join(f"{entry['backend']} {entry['precision']} on {entry['device']}: "
                            f"{entry['reason']}" for entry in skipped)
        raise CvigMissingDependency(f"no backend could be benchmarked: {reasons}")
    record["runs"], record["skipped"] = runs, skipped
    return _finish_record(record)


# -- end to end -------------------------------------------------------------------------------


def _default_checkpoint() -> Path:
    from cvig_engine.demo import bundled_checkpoint

    try:
        return bundled_checkpoint()
    except CvigInputError as error:
        raise CvigInputError(f"{error}; give --checkpoint CHECKPOINT") from None


def bench_e2e(work_dir=None, *, checkpoint=None, pairs: int = 200, seed: int = 2026,
              tile_size: int = 256, pano_height: int = 128, pano_width: int = 512,
              backend: str = "auto", device: str = "auto", precision: str = "fp32",
              batch_size: int = 32, workers: int | None = None, score_device: str = "auto",
              progress: bool = True) -> dict:
    """From a synthetic city's CSV to scores and a report, with the wall time of each stage.

    Stages: synth (two cities of ``pairs`` pairs each: synth always holds out whole cities, and
    the held-out one, ``test.csv``, is the one benchmarked), export (the checkpoint to ONNX,
    checked), embed, score, evaluate.

    Args:
        work_dir: folder for the city, model, features, scores and report (kept); default a
            temporary folder, removed afterwards.
        checkpoint: the model (default: the bundled tiny model, when this installation has it).
        pairs, seed, tile_size, pano_height, pano_width: the synthetic test city.
        backend, device, precision, batch_size, workers: passed to ``embed_dataset``.
        score_device: passed to ``score_feature_store``.

    Returns:
        The result record (kind "e2e"): ``stages`` (seconds and what each stage reported),
        ``total_seconds``, ``metrics``.
    """
    from cvig_engine.embed import embed_dataset
    from cvig_engine.evaluate import evaluate_scores
    from cvig_engine.export import export_model
    from cvig_engine.scoring import score_feature_store
    from cvig_engine.synth import synthesize

    checkpoint = Path(checkpoint) if checkpoint else _default_checkpoint()
    if not checkpoint.is_file():
        raise CvigInputError(f"{checkpoint}: checkpoint not found")
    # "auto" resolved here, so that the record says where each stage ran
    device, score_device = _resolve_device(device), _resolve_device(score_device)
    settings = {"checkpoint": str(checkpoint), "pairs": int(pairs), "seed": seed,
                "tile_size": tile_size, "pano_height": pano_height, "pano_width": pano_width,
                "backend": backend, "device": device, "precision": precision,
                "batch_size": batch_size, "workers": workers, "score_device": score_device}
    record = _new_record("e2e", settings)
    stages = {}
    with tempfile.TemporaryDirectory(prefix="cvig-bench-e2e-") as temporary:
        folder = Path(work_dir) if work_dir else Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        data_dir, model_dir = folder / "data", folder / "model"
        features, scores = folder / "features.h5", folder / "scores.h5"
        report_dir = folder / "report"
        for stale in (features, scores):
            stale.unlink(missing_ok=True)  # a fresh city: old features and scores do not apply

        def stage(name, function):
            started = time.perf_counter()
            result = function()
            stages[name] = {"seconds": time.perf_counter() - started}
            return result

        # synth holds out whole cities: a training city of the same size is rendered too
        stage("synth", lambda: synthesize(data_dir, pairs=2 * pairs, cities=2, test_cities=1,
                                          seed=seed, tile_size=tile_size, pano_height=pano_height,
                                          pano_width=pano_width, overwrite=True, progress=progress))
        stages["synth"].update(pairs_rendered=2 * int(pairs), test_pairs=int(pairs))
        manifest = stage("export", lambda: export_model(checkpoint, model_dir, precision=precision,
                                                        progress=progress))
        embedded = stage("embed", lambda: embed_dataset(
            model_dir, data_dir / "test.csv", features, backend=backend, device=device,
            precision=precision, batch_size=batch_size, workers=workers, progress=progress))
        stages["embed"].update({key: embedded.get(key) for key in
                                ("ground", "aerial", "images_per_second", "backend", "precision")})
        scored = stage("score", lambda: score_feature_store(features, scores, device=score_device,
                                                            overwrite=True, progress=progress))
        stages["score"].update({key: scored.get(key) for key in
                                ("kernel", "device", "num_queries", "num_tiles")})
        stage("evaluate", lambda: evaluate_scores([scores], report_dir))
        record["model"] = {"sha256": manifest.get("model_sha256"),
                           "backbone": manifest["config"].get("backbone"),
                           "fov": manifest["config"].get("fov")}
        record["work_dir"] = str(folder) if work_dir else None
    record["stages"] = stages
    record["total_seconds"] = sum(entry["seconds"] for entry in stages.values())
    record["metrics"] = scored["metrics"]
    return _finish_record(record)


# -- summary tables ---------------------------------------------------------------------------


def load_results(folder) -> tuple[list[dict], list[str]]:
    """Result records in ``folder`` (*.json), and the names of files that are not results."""
    records, others = [], []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            others.append(path.name)
            continue
        if (isinstance(document, dict) and document.get("kind") in RESULT_KINDS
                and "machine" in document):
            document["_file"] = path.name
            records.append(document)
        else:
            others.append(path.name)
    return records, others


def _machine_label(record: dict) -> str:
    machine = record["machine"]
    if str(record["settings"].get("device", "")).startswith("cuda") and machine.get("gpu"):
        return machine["gpu"]["name"]
    cores = machine.get("cores_available") or machine.get("logical_cores")
    return f"{machine.get('cpu_model', '?')} ({cores} cores)"


def _number(value, digits: int = 2) -> str:
    """A table cell: n/a for None, thousands separators from 10,000 up."""
    if value is None:
        return "n/a"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _gib(value) -> str:
    return "n/a" if not value else f"{value / 2**30:.2f}"


def _peak_gpu(memory: dict) -> int | None:
    values = [memory.get("torch_peak_reserved_bytes"), memory.get("cupy_pool_bytes")]
    values = [value for value in values if value]
    return sum(values) if values else None


def _latest(records: list[dict], key) -> list[dict]:
    """The newest record for each configuration ``key(record)``, oldest configuration first."""
    newest = {}
    for record in sorted(records, key=lambda item: item["created"]):
        newest[key(record)] = record
    return sorted(newest.values(), key=lambda item: (_machine_label(item), item["created"]))


def _score_table(records) -> list[str]:
    lines = ["| machine | device | N × M | Wg | engine | seconds | pairs/s "
             "| TFLOP/s (direct count) | TFLOP/s (own count) | own / matmul ceiling "
             "| naive seconds | speed-up | peak RSS GiB | peak GPU GiB | load (1 min) | file |",
             "|" + " --- |" * 16]
    settings_key = ("num_queries", "num_tiles", "ground_width", "device", "algorithm", "precision",
                    "threads")
    for record in _latest(records, lambda r: (_machine_label(r),) + tuple(
            r["settings"].get(name) for name in settings_key)):
        settings, engine, naive = record["settings"], record["engine"], record["naive"]
        naive_text = _number(naive["seconds"], 1)
        if naive["extrapolated"]:
            naive_text += " (extrapolated)"
        lines.append(
            f"| {_machine_label(record)} | {settings['device']} | {settings['num_queries']:,} × "
            f"{settings['num_tiles']:,} | {settings['ground_width']} | {engine['kernel']} "
            f"{settings['precision']} | {_number(engine['seconds'], 1)} | "
            f"{_number(engine['pairs_per_second'], 0)} | {engine['tflops_direct_count']:.3g} | "
            f"{engine['tflops_algorithm_count']:.3g} | "
            f"{engine['fraction_of_matmul_ceiling']:.1%} | {naive_text} | "
            f"{_number(record['speedup_over_naive'], 1)}× | {_gib(engine['peak_rss_bytes'])} | "
            f"{_gib(_peak_gpu(engine.get('gpu_memory') or {}))} | "
            f"{_number(record['machine']['load_average_1min_at_start'], 1)} | {record['_file']} |")
    return lines


def _encode_table(records) -> list[str]:
    lines = ["| machine | model | backend | device | precision | encoder | batch | p50 ms | p95 ms "
             "| p99 ms | images/s | peak GPU GiB | load (1 min) | file |",
             "|" + " --- |" * 14]
    rows = {}
    for record in sorted(records, key=lambda item: item["created"]):
        config = record["settings"]["model_config"]
        model = f"{config.get('backbone')} {config.get('fov')}°"
        for run in record["runs"]:
            for role, result in run["roles"].items():
                shape = "×".join(str(value) for value in result["input_shape"][2:])
                key = (_machine_label(record), model, run["backend"], run["device"],
                       run["precision"], role, record["settings"]["batch"])
                latency = result["latency_ms"]
                rows[key] = (f"| {key[0]} | {model} | {run['backend']} | {run['device']} | "
                             f"{run['precision']} | {role} {shape} | {key[6]} | "
                             f"{latency['p50']:.2f} | {latency['p95']:.2f} | "
                             f"{latency['p99']:.2f} | "
                             f"{_number(result['images_per_second'], 1)} | "
                             f"{_gib(_peak_gpu(run.get('gpu_memory') or {}))} | "
                             f"{_number(record['machine']['load_average_1min_at_start'], 1)} | "
                             f"{record['_file']} |")
    return lines + [rows[key] for key in sorted(rows, key=str)]


def _e2e_table(records) -> list[str]:
    stage_names = ("synth", "export", "embed", "score", "evaluate")
    lines = ["| machine | model | pairs | " + " | ".join(f"{name} s" for name in stage_names) +
             " | total s | top-1 % | top-1% % | load (1 min) | file |",
             "|" + " --- |" * (len(stage_names) + 9)]
    def configuration(record):
        settings = record["settings"]
        return (_machine_label(record), settings["pairs"], settings["checkpoint"],
                settings["backend"], settings["device"], settings["precision"])

    for record in _latest(records, configuration):
        model = record.get("model", {})
        stages = record["stages"]
        metrics = record.get("metrics", {})
        lines.append(
            f"| {_machine_label(record)} | {model.get('backbone')} {model.get('fov')}° | "
            f"{record['settings']['pairs']} | " +
            " | ".join(_number(stages.get(name, {}).get("seconds"), 2) for name in stage_names) +
            f" | {_number(record['total_seconds'], 1)} | {_number(metrics.get('top1'), 1)} | "
            f"{_number(metrics.get('top1pct'), 1)} | "
            f"{_number(record['machine']['load_average_1min_at_start'], 1)} | {record['_file']} |")
    return lines


def results_markdown(records: list[dict], others=()) -> str:
    """Markdown tables of the newest result per configuration, one table per kind."""
    titles = {"score": "Scoring (all pairs, orientation search)", "encode": "Encoders",
              "e2e": "End to end (synthetic city: synth, export, embed, score, evaluate)"}
    tables = {"score": _score_table, "encode": _encode_table, "e2e": _e2e_table}
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/summarize.py` from the JSON files in "
             "`benchmarks/results/` (the newest per machine and configuration). Each file names "
             "its machine in full: CPU, cores, memory, GPU, driver and library versions. "
             "\"load\" is the machine's 1-minute load average when the run started: other work "
             "on a shared machine slows a run down.", ""]
    for kind in RESULT_KINDS:
        chosen = [record for record in records if record["kind"] == kind]
        if not chosen:
            continue
        lines += [f"## {titles[kind]}", ""] + tables[kind](chosen) + [""]
    if not records:
        lines += ["No results yet: run `cvig-engine bench score|encode|e2e` (see "
                  "`benchmarks/README.md`).", ""]
    if others:
        names = ", ".join(f"`{name}`" for name in others)
        lines += [f"Files in another format, not summarised: {names}", ""]
    return "\n".join(lines)


def _child_main(arguments: list[str]) -> None:
    """``python -m cvig_engine.bench NAME JSON``: run one child function, print its JSON result."""
    name, keywords = arguments
    result = _CHILD_FUNCTIONS[name](**json.loads(keywords))
    result["peak_rss_bytes"] = _peak_rss_bytes()
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    _child_main(sys.argv[1:])
