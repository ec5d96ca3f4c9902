"""`mmkit train-gates`: train DyVTE exit gates for a model (self-labelled, the model stays frozen)."""

import json

import click

from mmkit.cli.options import calibration_data_options, device_option, model_option

DEFAULT_OUT = "runs/dyvte-gates"


@click.command("train-gates")
@model_option
@click.option("--samples", default=512, show_default=True, type=click.IntRange(8),
              help="Training questions to label (reference world, world seed 0, no captions; or from --data/--coco).")
@click.option("--seed", default=0, show_default=True, type=int, help="Question sample, split and gate init.")
@click.option("--out", "out_dir", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
              help="Directory for gates.safetensors and gates.json (files replaced atomically).")
@click.option("--min-layer", default=1, show_default=True, type=click.IntRange(1), help="First gated layer.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Questions per forward.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1), help="Gate fit steps.")
@click.option("--width", default=128, show_default=True, type=click.IntRange(1), help="Hidden width of each gate.")
@click.option("--features", "features_cache", default=None, type=click.Path(dir_okay=False),
              help="Cache file for the labelled gate inputs: reused when its settings match, written otherwise.")
@calibration_data_options
@device_option
def train_gates(model, samples, seed, out_dir, min_layer, batch_size, steps, width, features_cache, data, images, coco,
                device):
    """Label where each training sample may drop its visual tokens, then fit one small exit gate per layer.

    Use the result with `--method dyvte:gates=OUT`. Deterministic for a seed on CPU.
    """
    from mmkit.errors import MmkitError
    from mmkit.evals.calibration_data import describe_source, user_samples
    from mmkit.pruning.dyvte_train import GateTrainConfig
    from mmkit.pruning.dyvte_train import train_gates as run

    try:
        cfg = GateTrainConfig(samples=samples, seed=seed, min_layer=min_layer, batch_size=batch_size, steps=steps,
                              width=width)
    except ValueError as err:
        raise MmkitError(str(err)) from None
    # Captions are long answers; the gates are trained on short-answer questions, as on the world.
    items = user_samples(data, images, coco, n=samples, seed=seed, kinds_excluded=("caption",))
    _, report = run(model, cfg, out_dir=out_dir, device=device, features_cache=features_cache, data=items,
                    data_source=describe_source(data, images, coco))
    val = report["metrics"].get("val", report["metrics"]["train"])
    click.echo(f"saved {out_dir}/gates.safetensors (layers {report['layers']}, labelling "
               f"{report['seconds']['labelling']} s)")
    click.echo(json.dumps({
        "label_positive_rate": {k: round(v, 3) for k, v in report["metrics"]["label_positive_rate"].items()},
        "val_accuracy": {k: round(v["accuracy"], 3) for k, v in val["per_layer"].items()},
        "val_mean_exit_layer": round(val["mean_exit_layer"], 3),
        "val_exit_correct_rate": round(val["exit_correct_rate"], 3),
    }))
