"""`cvig-engine locate`: top-K candidate tiles (lat/lon, distance, compass heading) for new
photos."""
import click


@click.command("locate")
@click.argument("photos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--tiles", required=True, type=click.Path(dir_okay=False),
              help="Feature store whose aerial tiles are the gallery (cvig-engine embed).")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="The exported model (cvig-engine export) that made --tiles.")
@click.option("--topk", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--backend", default="auto", show_default=True,
              help="auto, torch, onnxruntime or tensorrt.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--photo-fov", type=float, default=None,
              help="The photos' field of view in degrees (default: the model's; "
                   "360 crops panoramas).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a scatter plot of the candidates on lat/lon axes (PNG).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the JSON here instead of standard output.")
def locate_command(photos, tiles, model_dir, topk, backend, device, photo_fov, plot, output):
    """Rank the gallery's tiles for each PHOTO; print JSON with lat/lon, distance and heading."""
    from pathlib import Path

    from cvig_engine.locate import format_json, locate_photos

    result = locate_photos(photos, tiles, model_dir, topk=topk, backend=backend, device=device,
                           photo_fov=photo_fov, plot=plot)
    if output:
        Path(output).write_text(format_json(result) + "\n")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(format_json(result))
