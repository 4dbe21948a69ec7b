"""`cvig-engine embed`: encode a dataset's photos and tiles into an HDF5 feature store."""
import click


@click.command("embed")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--data", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="Dataset CSV (WITW or CVUSA layout), or a tile list (an 'overhead' column "
                   "and no 'surface' column) for a reference gallery.")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Feature store to write (FEATURES.h5); an unfinished one is resumed.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime", "tensorrt"]),
              default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True)
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per encoder call (a resumed store keeps its own).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes [default: CPU count - 1, at most 8; 0: decode in the "
                   "main process].")
@click.option("--storage", "storage_dtype", type=click.Choice(["float32", "float16"]),
              default="float32", show_default=True, help="Feature type on disk.")
@click.option("--skip-bad", is_flag=True,
              help="Leave out rows with missing or undecodable files; they are listed in "
                   "/skipped.")
@click.option("--strict", is_flag=True,
              help="Fail instead of letting onnxruntime fall back to another provider.")
@click.option("--include-unusable", is_flag=True, help="Also embed rows with usable = 0.")
@click.option("--crop-seed", type=int, default=0, show_default=True,
              help="Seed of the per-row crop of 360 deg panoramas for a narrower-fov model.")
@click.option("--jpeg-decoder", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
              show_default=True, help="auto: nvjpeg on the GPU when the backend runs on CUDA.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def embed_command(model_dir, csv_path, out_path, **options):
    """Encode every photo and distinct tile of a dataset with MODEL_DIR into FEATURES.h5."""
    import json

    from cvig_engine.embed import embed_dataset

    summary = embed_dataset(model_dir, csv_path, out_path, **options)
    state = ("already complete" if summary["already_complete"]
             else "resumed" if summary["resumed"] else "written")
    click.echo(f"{summary['path']}: {summary['ground']} photos, {summary['aerial']} tiles, "
               f"{summary['skipped_rows']} rows skipped ({state}; {summary['backend']} "
               f"{summary['precision']}, {summary['images_per_second']:.1f} images/s)")
    click.echo(json.dumps(summary, indent=2), err=True)
