import click

from mmkit.cli.options import device_option, dtype_option, method_option, model_option


@click.command("eval")
@model_option
@click.option("--bench", type=click.Choice(["pope", "chair", "vqa", "ground"]), default="pope", show_default=True)
@click.option("--split", default=None, help="pope: random|popular|adversarial; vqa: all|color|count|spatial; "
                                           "chair: detailed|short|all.")
@method_option
@click.option("--limit", type=int, default=None, help="Number of questions (bench default if omitted).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--decoding", type=click.Choice(["greedy", "sample"]), default="greedy", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--world-seed", type=int, default=1, show_default=True,
              help="World seed of the generated bench (the reference model was trained on seed 0).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Override the bench's answer length (chair/detailed 128, other chair splits 64).")
@click.option("--out", "out", default=None, help="Output directory (results.json, samples.jsonl); resumable.")
@click.option("--sam", default=None, help="ground: SAM checkpoint directory or hub id (default: the shipped small SAM).")
@click.option("--ground-mode", type=click.Choice(["describe", "query"]), default="describe", show_default=True,
              help="ground: ground every object the model lists (describe) or each asked object (query).")
@device_option
@dtype_option
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def eval_command(model, bench, split, methods, limit, batch_size, decoding, seed, world_seed, max_new_tokens, out,
                 sam, ground_mode, device, dtype, no_progress):
    """Evaluate a model (with methods) on a reference-world bench; prints a table and writes DIR/results.json."""
    from mmkit.evals.report import report_table
    from mmkit.evals.runner import run_eval

    result = run_eval(model=model, bench=bench, split=split, methods=methods, limit=limit, batch_size=batch_size,
                      decoding=decoding, seed=seed, world_seed=world_seed, out=out, max_new_tokens=max_new_tokens,
                      device=device, dtype=dtype, progress=not no_progress, sam=sam, ground_mode=ground_mode)
    if not result:
        return  # a non-zero rank of a multi-process run: rank 0 merges and reports
    click.echo(report_table([result]))
    if out:
        click.echo(f"wrote {out}/results.json", err=True)
