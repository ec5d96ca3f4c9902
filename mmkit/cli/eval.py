import click

from mmkit.cli.options import device_option, dtype_option, method_option, model_option


@click.command("eval")
@model_option
@click.option("--bench", type=click.Choice(["pope", "chair", "vqa", "ground"]), default="pope", show_default=True)
@click.option("--split", default=None, help="pope: random|popular|adversarial; vqa: all|color|count|spatial; "
              "chair: detailed|short|all. With --data: the POPE category or VQA type to keep.")
@method_option
@click.option("--limit", type=int, default=None,
              help="Number of questions (bench default if omitted; with --data all; with --coco 500 images).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--decoding", type=click.Choice(["greedy", "sample"]), default="greedy", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sampling seed (with --coco also the seed of the image sample).")
@click.option("--world-seed", type=int, default=1, show_default=True,
              help="World seed of the generated bench (the reference model was trained on seed 0).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Override the bench's answer length (world chair: detailed 128, short and all 64).")
@click.option("--out", "out", default=None, help="Output directory (results.json, samples.jsonl); resumable.")
@click.option("--sam", default=None, help="ground: SAM checkpoint directory or hub id (default: the shipped small SAM).")
@click.option("--ground-mode", type=click.Choice(["describe", "query"]), default="describe", show_default=True,
              help="ground: ground every object the model lists (describe) or each asked object (query).")
@click.option("--data", default=None,
              help="pope: POPE question file (JSON lines) or lmms-eval POPE parquet file/directory; vqa: JSON lines "
                   "of image, question, answer [, choices, type].")
@click.option("--images", default=None, help="Image directory of --data (e.g. COCO val2014/).")
@click.option("--coco", default=None,
              help="chair: COCO directory (annotations/instances_val2014.json, captions_val2014.json, val2014/).")
@click.option("--prompt", default=None, help="chair with --coco: the prompt (default: \"Please describe this image "
                                             "in detail.\").")
@click.option("--prompt-suffix", default=None,
              help="--data: text appended to each question (default: LLaVA-1.5's \"\\nAnswer the question using a "
                   "single word or phrase.\"; '' for none).")
@device_option
@dtype_option
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def eval_command(model, bench, split, methods, limit, batch_size, decoding, seed, world_seed, max_new_tokens, out,
                 sam, ground_mode, data, images, coco, prompt, prompt_suffix, device, dtype, no_progress):
    """Evaluate a model (with methods) on a reference-world bench, or on benchmark files (--data / --coco); prints
    a table and writes DIR/results.json."""
    from mmkit.evals.report import report_table
    from mmkit.evals.runner import run_eval

    result = run_eval(model=model, bench=bench, split=split, methods=methods, limit=limit, batch_size=batch_size,
                      decoding=decoding, seed=seed, world_seed=world_seed, out=out, max_new_tokens=max_new_tokens,
                      device=device, dtype=dtype, progress=not no_progress, sam=sam, ground_mode=ground_mode,
                      data=data, images=images, coco=coco, prompt=prompt,
                      prompt_suffix=None if prompt_suffix is None else prompt_suffix.replace("\\n", "\n"))
    if not result:
        return  # a non-zero rank of a multi-process run: rank 0 merges and reports
    click.echo(report_table([result]))
    if out:
        click.echo(f"wrote {out}/results.json", err=True)
