"""`cvig-engine filter`: the usable-scene filter and density-limited subsets."""
import json

import click

_EPILOG = """\b
Examples:
  cvig-engine filter features --data train.csv -o photo_stats.csv
  cvig-engine filter train --features places365.csv --labels hand_labels.csv -o usable_filter
  cvig-engine filter apply usable_filter --features places365.csv --data train.csv -o usable.csv
  cvig-engine filter density --data usable.csv --cell-size 50 --max-per-cell 20 -o thinned.csv
"""

_POOLING = click.option(
    "--store-pooling", type=click.Choice(["mean", "flatten"]), default="mean", show_default=True,
    help="For a feature store (.h5 with /ground/features): per-channel means or the whole map.")


@click.group("filter", epilog=_EPILOG)
def filter_command():
    """Curate a dataset: drop unusable photos (SVM ensemble), cap pairs per grid cell.

    Feature files: .csv (an `id` column + numbers), .npy ([N, D]; ids from <stem>.ids.txt, else
    row order), .h5 (/features + /ids, or a feature store's /ground/features + /ground/ids).
    Photo ids are surface paths relative to the dataset CSV's folder.
    """


@filter_command.command("train")
@click.option("--features", "features_path", required=True, type=click.Path(dir_okay=False),
              help="Per-photo feature vectors (e.g. 467 Places365 scene + attribute scores).")
@click.option("--labels", "labels_path", required=True, type=click.Path(dir_okay=False),
              help="Hand labels: CSV id,usable (1/0), or a dataset CSV with a usable column.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Filter to write: OUTPUT.safetensors (arrays) and OUTPUT.json (no pickle).")
@click.option("--members", type=int, default=10, show_default=True, help="SVMs in the ensemble.")
@click.option("--kernel", type=click.Choice(["rbf", "linear", "poly", "sigmoid"]), default="rbf",
              show_default=True)
@click.option("--svm-c", "regularisation", type=float, default=1.0, show_default=True,
              help="SVM regularisation C.")
@click.option("--threshold", type=float, default=0.0, show_default=True,
              help="Keep a photo when the members' mean decision value is above this.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the split and bootstraps.")
@_POOLING
def train_command(features_path, labels_path, output, members, kernel, regularisation, threshold,
                  seed, store_pooling):
    """Train on half of the labels, test on the other half; report precision, recall, pass rate."""
    from cvig_engine.curate import train_filter_files

    report = train_filter_files(features_path, labels_path, output, members=members, kernel=kernel,
                                regularisation=regularisation, threshold=threshold, seed=seed,
                                store_pooling=store_pooling)
    test = report["test"]
    click.echo(json.dumps(report, indent=2))
    click.echo(f"test half ({test['photos']} photos): precision {test['precision']}, recall "
               f"{test['recall']}, pass rate {test['pass_rate']}", err=True)


@filter_command.command("apply")
@click.argument("filter_path", metavar="FILTER", type=click.Path(dir_okay=False))
@click.option("--features", "features_path", required=True, type=click.Path(dir_okay=False),
              help="Feature vectors of the dataset's photos (same kind as in training).")
@click.option("--data", "data_csv", required=True, type=click.Path(dir_okay=False),
              help="Dataset CSV (WITW layout) to filter.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Filtered dataset CSV (the rows whose photo is usable, in input order).")
@click.option("--threshold", type=float, default=None, help="Override the filter's threshold.")
@click.option("--scores", "scores_path", type=click.Path(dir_okay=False),
              help="Also write every photo's ensemble score and decision to this CSV.")
@_POOLING
def apply_command(filter_path, features_path, data_csv, output, threshold, scores_path,
                  store_pooling):
    """Write the dataset rows whose photos the filter keeps."""
    from cvig_engine.curate import apply_filter_files

    summary = apply_filter_files(filter_path, features_path, data_csv, output, threshold=threshold,
                                 scores_path=scores_path, store_pooling=store_pooling)
    click.echo(json.dumps(summary, indent=2))


@filter_command.command("features")
@click.option("--data", "data_csv", required=True, type=click.Path(dir_okay=False),
              help="Dataset CSV whose surface photos to describe.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Feature CSV: id + 25 colour and texture statistics per photo.")
def features_command(data_csv, output):
    """Simple colour/texture statistics per photo, a stand-in where no Places365 scores exist."""
    from cvig_engine.curate import photo_statistics_csv

    count = photo_statistics_csv(data_csv, output)
    click.echo(f"{count} photos described in {output}")


@filter_command.command("density")
@click.option("--data", "data_csv", required=True, type=click.Path(dir_okay=False),
              help="Dataset CSV.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Subset CSV.")
@click.option("--cell-size", type=float, required=True, help="Grid cell side R in metres.")
@click.option("--max-per-cell", type=int, required=True,
              help="Keep at most this many pairs per cell.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the choice within a cell.")
def density_command(data_csv, output, cell_size, max_per_cell, seed):
    """Keep at most K pairs per R-metre grid cell (per city, local equirectangular grid)."""
    from cvig_engine.curate import density_limit_csv

    summary = density_limit_csv(data_csv, output, cell_size=cell_size, max_per_cell=max_per_cell,
                                seed=seed)
    click.echo(json.dumps(summary, indent=2))
