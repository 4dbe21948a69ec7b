"""`cvig-engine score`: rank every aerial tile for every ground photo of a feature store."""
import click

_EPILOG = """\b
Examples:
  cvig-engine score --features paris.features.h5 -o paris.scores.h5
  cvig-engine score --features cvusa.h5 -o cvusa.scores.h5 --device cpu --store-matrix
  cvig-engine score MODEL_DIR --data paris.csv -o paris.scores.h5   # embeds first (cached)
"""

_TABLE = [("top1", "top-1", "%"), ("top5", "top-5", "%"), ("top10", "top-10", "%"),
          ("top1pct", "top-1%", "%"), ("mean_rank", "mean rank", ""),
          ("median_rank", "median rank", ""), ("exact_bin", "heading: exact bin", "%"),
          ("within_10pct_fov", "heading: within 10% of fov", "%"),
          ("median_heading_error_deg", "heading: median error", " deg")]


def metrics_lines(metrics: dict) -> list[str]:
    """The metrics as an aligned two-column table."""
    lines = []
    for key, title, unit in _TABLE:
        if key not in metrics:
            continue
        value = metrics[key]
        text = "n/a" if value is None else (f"{value:.2f}{unit}" if unit else f"{value:.1f}")
        lines.append(f"  {title:<28} {text}")
    return lines


@click.command("score", epilog=_EPILOG)
@click.argument("model_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_csv", type=click.Path(dir_okay=False),
              help="With MODEL_DIR: the dataset CSV to embed before scoring.")
@click.option("--features", type=click.Path(dir_okay=False),
              help="Feature store to score (FEATURES.h5). With MODEL_DIR: where the embedded "
                   "features are cached [default: OUTPUT with .features.h5].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="SCORES.h5 to write; an unfinished one with the same inputs is resumed.")
@click.option("--topk", type=click.IntRange(min=1), default=10, show_default=True,
              help="Best tiles kept per query.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--tile", default=None, metavar="QxA",
              help="Queries x tiles per tile of pairs [default: 512x1024 on the CPU, 4096x8192 on "
                   "CUDA]; memory grows with Q*A, and Q queries are the unit of resume.")
@click.option("--store-matrix", is_flag=True,
              help="Also write the full float32 distance matrix /distance [N, M].")
@click.option("--ties", type=click.Choice(["pessimistic", "optimistic"]), default="pessimistic",
              show_default=True,
              help="pessimistic (WITW): tiles as close as the true one count against the query; "
                   "optimistic (DSM): only strictly closer tiles count.")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default="fp32",
              show_default=True,
              help="GEMM inputs on CUDA; below fp32 a sample of queries is rescored in fp32 and "
                   "the changed ranks are recorded.")
@click.option("--algorithm", type=click.Choice(["auto", "spectral", "direct"]), default="auto",
              show_default=True, help="auto picks the cheaper one for the feature shapes.")
@click.option("--overwrite", is_flag=True, help="Replace an OUTPUT that cannot be resumed.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def score_command(model_dir, data_csv, features, output, **options):
    """Score every ground photo against every aerial tile: ranks, top-K, metrics.

    Writes SCORES.h5 (/rank, /true_distance, /true_shift, /topk/*, optionally /distance, and
    the metrics as a root attribute) and prints the metrics.
    """
    from pathlib import Path

    from cvig_engine.errors import CvigInputError
    from cvig_engine.scoring import score_feature_store

    expected_model = None
    if model_dir is not None:
        if data_csv is None:
            raise CvigInputError("score MODEL_DIR needs --data DATASET.csv (or score a feature "
                                 "store with --features and no MODEL_DIR)")
        from cvig_engine.embed import embed_dataset
        from cvig_engine.export import read_manifest

        if features is None:
            features = str(Path(output).with_suffix("")) + ".features.h5"
        expected_model = read_manifest(model_dir, verify=False).get("model_sha256")
        device = options["device"]
        embed_dataset(model_dir, data_csv, features, device=device,
                      progress=options["progress"])
    elif features is None:
        raise CvigInputError("give --features FEATURES.h5 (or MODEL_DIR --data DATASET.csv)")
    elif data_csv is not None:
        raise CvigInputError("--data needs MODEL_DIR (the model that embeds it)")
    summary = score_feature_store(features, output, expected_model_sha256=expected_model,
                                  **options)
    state = ("already complete" if summary["already_complete"]
             else "resumed" if summary["resumed"] else "written")
    click.echo(f"{summary['output']}: {summary['num_queries']} queries x {summary['num_tiles']} "
               f"tiles ({state}; {summary['kernel']} {summary['precision']}, "
               f"{summary['elapsed_seconds']:.1f} s, {options['ties']} ties)")
    if summary.get("kernel_fallback_reason"):
        click.echo(f"note: the CUDA kernel could not load ({summary['kernel_fallback_reason']}); "
                   "torch CUDA scored instead", err=True)
    metrics = summary["metrics"]
    click.echo(f"{metrics.get('num_queries', 0)} queries with a known true tile:")
    for line in metrics_lines(metrics):
        click.echo(line)
