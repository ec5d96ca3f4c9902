from pathlib import Path

import click


@click.command()
@click.argument("dirs", nargs=-1, required=True)
@click.option("--plot", "plot", default=None, help="PNG path for the accuracy-vs-cost plot (default: none).")
def report(dirs, plot):
    """Side-by-side table of eval runs (DIR/results.json), and an optional Pareto plot."""
    from mmkit.evals.report import load_run, plot_pareto, report_table

    runs = [load_run(Path(d)) for d in dirs]
    click.echo(report_table(runs))
    if plot:
        plot_pareto(runs, plot)
        click.echo(f"wrote {plot}", err=True)
