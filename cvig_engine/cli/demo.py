"""`cvig-engine demo`: the whole pipeline on a synthetic held-out city and the bundled model."""
import click


@click.command("demo")
@click.option("-o", "--output", "out_dir", default="cvig-demo", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder for the data, model, features, scores and report.")
@click.option("--pairs", type=click.IntRange(min=2), default=400, show_default=True,
              help="Photo/tile pairs in the synthetic test city.")
@click.option("--seed", type=int, default=None,
              help="Synthetic world seed (default: the demo's own).")
@click.option("--fast", is_flag=True, help="Small images and 60 pairs: a smoke test in seconds.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Use this checkpoint instead of the bundled tiny model.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo_command(out_dir, pairs, seed, fast, checkpoint, progress):
    """Synthesise a held-out city, export the bundled model, embed (ONNX Runtime), score,
    evaluate."""
    from cvig_engine.demo import DEMO_SEED, run_demo

    sizes = dict(tile_size=64, pano_height=32, pano_width=128) if fast else {}
    if fast and pairs == 400:
        pairs = 60
    run_demo(out_dir, pairs=pairs, seed=DEMO_SEED if seed is None else seed, checkpoint=checkpoint,
             progress=progress, **sizes)
