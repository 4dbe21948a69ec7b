"""`cvig-engine evaluate`."""
import click

_EPILOG = """\b
Examples:
  cvig-engine evaluate paris.h5 london.h5 -o report/
  cvig-engine evaluate seed1.h5 seed2.h5 --label paris --label paris -o report/
  cvig-engine evaluate --group baseline='runs/base_*.h5' --group masks='runs/mask_*.h5' -o report/
"""


@click.command("evaluate", epilog=_EPILOG)
@click.argument("score_files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "report_dir", required=True, type=click.Path(file_okay=False),
              help="Report directory: report.json, report.md, recall_at_k.png, rank_cdf.png.")
@click.option("--label", "labels", multiple=True,
              help="City label of each SCORES file, in order (default: the file's `city` "
                   "attribute, else its name). Files with the same label are trials.")
@click.option("--group", "group_options", multiple=True, metavar="NAME=PATTERN[,PATTERN...]",
              help="A configuration: its SCORES files (paths or quoted globs). Each later group is "
                   "compared with the first by a t-test, city by city (cities from the files' "
                   "`city` attribute).")
@click.option("--ties", "tie_rule", type=click.Choice(["pessimistic", "optimistic"]), default=None,
              help="Tie rule of the ranks. Default: the rule the files were scored with "
                   "(pessimistic = WITW, ties count against the query; optimistic = DSM's strict "
                   "<). Another rule needs the files' /distance matrix (score --store-matrix).")
@click.option("--compare-metric", type=click.Choice(
    ["top1", "top5", "top10", "top1pct", "mean_rank", "median_rank"]), default="top1pct",
    show_default=True, help="Per-trial metric that the two-sample t-test compares.")
def evaluate_command(score_files, report_dir, labels, group_options, tie_rule, compare_metric):
    """Metrics, plots and a JSON + Markdown report from SCORES.h5 files of `cvig-engine score`.

    Each SCORES file is one city and trial; give several for several cities, trials (mean ± std)
    or, with --group, two configurations compared by Student's two-sample t-test.
    """
    from cvig_engine.evaluate.markdown import summary_text
    from cvig_engine.evaluate.report import evaluate_scores, parse_groups

    report = evaluate_scores(score_files, report_dir, labels=list(labels),
                             groups=parse_groups(group_options),
                             tie_rule=tie_rule, compare_metric=compare_metric)
    click.echo(summary_text(report))
    click.echo(f"report written to {report_dir}")
