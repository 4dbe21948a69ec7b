"""`cvig-engine train`."""
import click


@click.command("train")
@click.option("--data", "data_csv", required=True, type=click.Path(dir_okay=False),
              help="Training CSV (WITW or CVUSA layout).")
@click.option("-o", "--output", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory (resumed if it holds a previous run's state).")
@click.option("--backbone", type=click.Choice(["tiny", "vgg16"]), default="tiny", show_default=True)
@click.option("--fov", type=float, default=360.0, show_default=True,
              help="Ground field of view (deg).")
@click.option("--warmup-epochs", type=int, default=0, show_default=True,
              help="Train the first N epochs on --warmup-fov views (limited-view models).")
@click.option("--warmup-fov", type=float, default=360.0, show_default=True,
              help="Field of view (deg) of the warm-up epochs' ground views.")
@click.option("--extra-fov", "extra_fovs", type=float, multiple=True,
              help="Also train every step on views this wide (deg), cut from the same "
                   "panoramas; the loss is the views' mean (repeatable).")
@click.option("--ground-width-rule", type=click.Choice(["witw", "dsm"]), default="witw",
              show_default=True,
              help="Rounding of the ground feature width (70 deg: witw 12, dsm 13).")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-5, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True, help="cosine: fall to zero over --epochs (per batch).")
@click.option("--ema-decay", type=float, default=0.0, show_default=True,
              help="Validate and keep a moving average of the weights (decay per batch, e.g. "
                   "0.998; 0: off).")
@click.option("--supervise-heading", is_flag=True,
              help="Score true pairs at their known heading (CSV heading + crop) in training; "
                   "negatives keep the orientation search.")
@click.option("--dropout", type=float, default=0.2, show_default=True,
              help="Dropout2d rate after the backbone's last convolution(s) (training only).")
@click.option("--alpha", type=float, default=10.0, show_default=True, help="Triplet loss weight.")
@click.option("--validation-size", type=int, default=1000, show_default=True)
@click.option("--patience", type=int, default=5, show_default=True,
              help="Epochs without improvement before stopping.")
@click.option("--min-delta", type=float, default=0.0, show_default=True,
              help="Smallest validation-loss decrease that counts as an improvement.")
@click.option("--max-minutes", type=float, default=None, help="Stop after this much wall time.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--city", "cities", multiple=True, help="Train only on these cities (repeatable).")
@click.option("--exclude-city", "exclude_cities", multiple=True,
              help="Leave these cities out (repeatable).")
@click.option("--global-mining", is_flag=True,
              help="Second half of each batch: nearest neighbours of the first.")
@click.option("--init-from", type=click.Path(dir_okay=False),
              help="Initial weights from another checkpoint.")
@click.option("--tile-offset", "tile_offset_px", type=float, default=0.0, show_default=True,
              help="Random tile offsets up to this many pixels (geotag-noise augmentation).")
@click.option("--colour-jitter", type=float, default=0.0, show_default=True,
              help="Random per-channel contrast and brightness of training views (std; 0: none).")
@click.option("--aerial-crop", type=float, default=1.0, show_default=True,
              help="Use the central fraction of each tile (compare overhead extents).")
@click.option("--no-orientation-search", "baseline", is_flag=True, help="Liu & Li style baseline.")
@click.option("--vertical-search", is_flag=True,
              help="Taller aerial map, vertical + horizontal search.")
@click.option("--image-scale", type=click.Choice(["1", "0.5"]), default="1", show_default=True,
              help="0.5 halves every input image (tiny backbone; 4x less compute).")
@click.option("--tiny-channels", default="8,16,32,64", show_default=True,
              help="Channels of the tiny backbone's four convolutions (fewer: faster steps).")
@click.option("--downsample", type=click.Choice(["pool", "stride"]), default="pool",
              show_default=True,
              help="Tiny backbone: max-pools, or stride-2 convolutions (a third faster on a CPU).")
@click.option("--in-channels", type=click.Choice(["3", "5"]), default="3", show_default=True,
              help="5 adds the building and road masks listed in the CSV.")
@click.option("--vgg-weights", type=click.Path(dir_okay=False), envvar="CVIG_VGG16_WEIGHTS",
              help="Local torchvision VGG16 state dict (never downloaded).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--skip-bad", is_flag=True,
              help="Log and skip unreadable images instead of stopping.")
@click.option("--cache-gb", type=float, default=4.0, show_default=True,
              help="Memory for inputs kept between epochs (about 0.4 MB per synthetic pair); "
                   "0: none.")
def train_command(data_csv, run_dir, backbone, fov, warmup_epochs, warmup_fov, extra_fovs,
                  ground_width_rule, epochs, batch_size,
                  learning_rate, lr_schedule, ema_decay, supervise_heading, dropout, alpha,
                  validation_size, patience, min_delta,
                  max_minutes, seed, cities, exclude_cities,
                  global_mining, init_from, tile_offset_px, colour_jitter, aerial_crop, baseline,
                  vertical_search, image_scale, tiny_channels, downsample, in_channels,
                  vgg_weights, device, skip_bad, cache_gb):
    """Train the twin model with the soft-margin triplet loss (resumable)."""
    import json
    import logging

    from cvig_engine.errors import CvigInputError
    from cvig_engine.train import TrainOptions, train

    try:
        channels = [int(part) for part in tiny_channels.split(",")]
    except ValueError:
        raise CvigInputError(f"--tiny-channels {tiny_channels!r}: expected four comma-separated "
                             "integers such as 8,16,32,64") from None

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = TrainOptions(
        backbone=backbone, fov=fov, warmup_epochs=warmup_epochs, warmup_fov=warmup_fov,
        extra_fovs=list(extra_fovs),
        ground_width_rule=ground_width_rule,
        in_channels=int(in_channels),
        orientation_search=not baseline, vertical_search=vertical_search, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, lr_schedule=lr_schedule,
        ema_decay=ema_decay, supervise_heading=supervise_heading, dropout=dropout,
        alpha=alpha,
        validation_size=validation_size,
        patience=patience, min_delta=min_delta, seed=seed, max_minutes=max_minutes,
        global_mining=global_mining,
        init_from=init_from, tile_offset_px=tile_offset_px, colour_jitter=colour_jitter,
        aerial_crop=aerial_crop,
        vgg_weights=vgg_weights, device=device, skip_bad=skip_bad,
        image_scale=float(image_scale), cache_gb=cache_gb,
        tiny_channels=channels, downsample=downsample)
    summary = train(data_csv, run_dir, options, cities=cities or None,
                    exclude_cities=exclude_cities or None)
    click.echo(json.dumps(summary, indent=2))
