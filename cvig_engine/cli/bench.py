"""`cvig-engine bench`: encoder latency, scoring throughput and the pipeline end to end."""
import click

_EPILOG = """\b
Examples:
  cvig-engine bench score --n 8884 --m 8884 --device cpu
  cvig-engine bench score --n 58270 --m 58270 --wg 13 --device cuda
  cvig-engine bench encode --model model_dir --backend torch --backend onnxruntime --batch 32
  cvig-engine bench e2e --checkpoint tiny.safetensors --pairs 200

Results go to benchmarks/results/<kind>_<gpu or host>_<date>.json unless --out says otherwise;
python benchmarks/summarize.py tabulates them in benchmarks/RESULTS.md.
"""


def _save(record, out) -> None:
    from cvig_engine.bench import write_result

    path = write_result(record, out)
    machine = record["machine"]
    click.echo(f"written {path} (load average {machine['load_average_1min_at_start']:.1f} at the "
               f"start, {record['load_average_end'][0]:.1f} at the end)")


@click.group("bench", epilog=_EPILOG)
def bench_group():
    """Benchmarks that write JSON naming the machine (see benchmarks/README.md)."""


@bench_group.command("score")
@click.option("--n", "num_queries", type=int, required=True, help="Ground maps (queries).")
@click.option("--m", "num_tiles", type=int, required=True, help="Aerial maps (tiles).")
@click.option("--wg", "ground_width", type=int, default=64, show_default=True,
              help="Ground map width: 64 at 360 deg, 12 (WITW) or 13 (DSM) at 70 deg.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--algorithm", type=click.Choice(["auto", "spectral", "direct"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default="fp32",
              show_default=True)
@click.option("--tile", default=None, metavar="QxA", help="Queries x tiles per tile of pairs.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads [default: torch's, usually the core count].")
@click.option("--naive-queries", type=int, default=None,
              help="Queries the naive baseline is timed on, then extrapolated to N "
                   "[default: 256 on CPU, 2048 on CUDA].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--kernel/--no-kernel", "use_kernel", default=True, show_default=True,
              help="On CUDA in fp32, the fused CuPy kernel (else torch CUDA).")
@click.option("--ceiling-matmul-size", type=click.IntRange(min=16), default=None,
              help="Side of the ceiling matmul [default: 2048 CPU, 8192 CUDA].")
@click.option("--ceiling-copy-mib", type=click.IntRange(min=1), default=None,
              help="Size of the ceiling copy [default: 256 CPU, 2048 CUDA].")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where the temporary feature store goes [default: the system's temp].")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON file to write.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def score_command(out, **options):
    """All-pairs scoring of random N x M features: pairs/s, TFLOP/s, speed-up over naive."""
    from cvig_engine.bench import bench_score

    record = bench_score(**options)
    settings, engine, naive = record["settings"], record["engine"], record["naive"]
    ceilings = record["ceilings"]
    click.echo(f"{settings['num_queries']} x {settings['num_tiles']} "
               f"(Wg {settings['ground_width']}) on {settings['device']}: {engine['kernel']} "
               f"{settings['precision']} {engine['seconds']:.2f} s, "
               f"{engine['pairs_per_second']:,.0f} pairs/s, "
               f"{engine['tflops_algorithm_count']:.3f} TFLOP/s own count "
               f"({engine['fraction_of_matmul_ceiling']:.1%} of the measured "
               f"{ceilings['matmul_tflops']:.2f}), {engine['tflops_direct_count']:.3f} TFLOP/s "
               f"direct count; peak RSS {engine['peak_rss_bytes'] / 2**30:.2f} GiB")
    extrapolated = (f"extrapolated from {naive['queries_timed']} queries"
                    if naive["extrapolated"] else "measured")
    click.echo(f"naive per-shift GEMM: {naive['seconds']:.2f} s ({extrapolated}); speed-up "
               f"{record['speedup_over_naive']:.1f}x; ranks agree on "
               f"{naive['rank_agreement']:.1%} of the timed queries")
    _save(record, out)


@bench_group.command("encode")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="An exported MODEL_DIR (cvig-engine export).")
@click.option("--backend", "backends", multiple=True,
              type=click.Choice(["torch", "onnxruntime", "tensorrt"]),
              help="Repeatable [default: every backend available on the device].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", "precisions", multiple=True,
              type=click.Choice(["fp32", "fp16", "bf16"]), help="Repeatable [default: fp32].")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch and onnxruntime [default: theirs].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="torch on CUDA [default: on, with the fixed batch].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON file to write.")
def encode_command(model_dir, out, precisions, **options):
    """Latency p50/p95/p99 and images/s of both encoders, per backend and precision."""
    from cvig_engine.bench import bench_encode

    record = bench_encode(model_dir, precisions=precisions or ("fp32",), **options)
    for run in record["runs"]:
        for role, result in run["roles"].items():
            latency = result["latency_ms"]
            click.echo(f"{run['backend']:<12} {run['device']:<7} {run['precision']:<5} {role:<7} "
                       f"batch {record['settings']['batch']}: p50 {latency['p50']:.2f} ms, "
                       f"p95 {latency['p95']:.2f}, p99 {latency['p99']:.2f}; "
                       f"{result['images_per_second']:,.1f} images/s")
    for entry in record["skipped"]:
        click.echo(f"skipped {entry['backend']} {entry['precision']} on {entry['device']}: "
                   f"{entry['reason']}", err=True)
    _save(record, out)


@bench_group.command("e2e")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Model checkpoint [default: the bundled tiny model, when installed].")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the city, model, features, scores and report here [default: a "
                   "temporary folder, removed].")
@click.option("--pairs", type=click.IntRange(min=2), default=200, show_default=True)
@click.option("--seed", type=int, default=2026, show_default=True)
@click.option("--tile-size", type=int, default=256, show_default=True)
@click.option("--pano-height", type=int, default=128, show_default=True)
@click.option("--pano-width", type=int, default=512, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]),
              default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="Embedding device.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True)
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes for embed [default: embed's].")
@click.option("--score-device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="JSON file to write.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def e2e_command(work_dir, out, **options):
    """A synthetic city from CSV to scores: synth, export, embed, score, evaluate, timed."""
    from cvig_engine.bench import bench_e2e

    record = bench_e2e(work_dir, **options)
    click.echo("stage seconds: " + ", ".join(f"{name} {stage['seconds']:.2f}"
                                             for name, stage in record["stages"].items())
               + f"; total {record['total_seconds']:.2f}")
    metrics = record["metrics"]
    click.echo(f"top-1 {metrics.get('top1', float('nan')):.1f}%, "
               f"top-1% {metrics.get('top1pct', float('nan')):.1f}%")
    _save(record, out)
