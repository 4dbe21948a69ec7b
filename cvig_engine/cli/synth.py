"""`cvig-engine synth`: render a synthetic cross-view dataset."""

import click

_SETTINGS_HELP = "See the README section 'Synthetic data' for what each knob does."


@click.command("synth", epilog=_SETTINGS_HELP)
@click.option(
    "-o",
    "--output",
    "output_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Dataset folder to create (must be empty unless --overwrite).",
)
@click.option(
    "--pairs",
    type=int,
    default=1000,
    show_default=True,
    help="Pairs in all (split evenly over cities).",
)
@click.option(
    "--cities", type=int, default=11, show_default=True, help="Cities, each with its own style."
)
@click.option(
    "--test-cities", type=int, default=1, show_default=True, help="Cities held out for test.csv."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--fov",
    type=float,
    default=360.0,
    show_default=True,
    help="360: panoramas; less: photos cut at a random, recorded heading (deg).",
)
@click.option(
    "--tile-size", type=int, default=256, show_default=True, help="Overhead tile size (px)."
)
@click.option(
    "--tile-extent",
    type=float,
    default=120.0,
    show_default=True,
    help="Ground covered by a tile (m).",
)
@click.option("--pano-height", type=int, default=128, show_default=True)
@click.option(
    "--pano-width",
    type=int,
    default=512,
    show_default=True,
    help="Width of a 360 deg panorama (px).",
)
@click.option(
    "--city-size", type=float, default=1000.0, show_default=True, help="Side of each city (m)."
)
@click.option("--eye-height", type=float, default=1.7, show_default=True, help="Camera height (m).")
@click.option(
    "--view-distance",
    type=float,
    default=150.0,
    show_default=True,
    help="Farthest visible object (m).",
)
@click.option(
    "--geotag-noise",
    type=float,
    default=2.0,
    show_default=True,
    help="Std of the photo-location to tile-centre offset per axis (m).",
)
@click.option(
    "--unusable-fraction",
    type=float,
    default=0.03,
    show_default=True,
    help="Share of close-up photos (a wall or the ground), flagged usable=0.",
)
@click.option(
    "--hotspots", type=int, default=3, show_default=True, help="Photo hot spots per city."
)
@click.option(
    "--hotspot-fraction",
    type=float,
    default=0.3,
    show_default=True,
    help="Share of photos taken around the hot spots.",
)
@click.option(
    "--hotspot-radius", type=float, default=40.0, show_default=True, help="Hot spot spread (m)."
)
@click.option(
    "--occluders",
    type=float,
    default=1.0,
    show_default=True,
    help="Mean number of people, poles and passing vehicles near the camera.",
)
@click.option(
    "--sensor-noise", type=float, default=0.02, show_default=True, help="Noise std (0..1 scale)."
)
@click.option(
    "--blur", type=float, default=0.5, show_default=True, help="Largest blur weight (0..1)."
)
@click.option(
    "--tilt-jitter", type=float, default=1.5, show_default=True, help="Pitch and roll std (deg)."
)
@click.option(
    "--masks/--no-masks", default=True, show_default=True, help="Write building and road masks."
)
@click.option(
    "--image-format",
    type=click.Choice(["jpeg", "png"]),
    default="jpeg",
    show_default=True,
    help="Photos and tiles (masks are always PNG): jpeg like real datasets, png lossless.",
)
@click.option(
    "--jpeg-quality", type=int, default=95, show_default=True, help="JPEG quality (1..100)."
)
@click.option(
    "--png-level",
    type=int,
    default=1,
    show_default=True,
    help="PNG zlib level (0 = fastest, largest).",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Processes rendering cities in parallel (the files do not depend on it).",
)
@click.option(
    "--overwrite", is_flag=True, help="Write into a non-empty folder (old extra files stay)."
)
def synth_command(output_dir, image_format, jpeg_quality, png_level, workers, overwrite, **knobs):
    """Render a procedural cross-view dataset (images, masks, WITW and CVUSA CSVs) into a folder."""
    import json

    from cvig_engine.synth import SynthSettings, synthesize

    settings = SynthSettings(**knobs).validate()
    summary = synthesize(
        output_dir,
        settings,
        overwrite=overwrite,
        png_level=png_level,
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        workers=workers,
    )
    cities = ", ".join(
        f"{city['name']} ({city['split']}, {city['pairs']})" for city in summary["cities"]
    )
    click.echo(
        f"wrote {summary['pairs']} pairs to {summary['output']}: {summary['train_pairs']} train, "
        f"{summary['test_pairs']} test"
    )
    click.echo(f"cities: {cities}")
    click.echo(json.dumps(summary["files"], indent=2))
