"""`mmkit train-visor`: train VISOR's cross-attention blocks and budget policy for a model (base model frozen)."""

import json

import click

from mmkit.cli.options import calibration_data_options, device_option, model_option

DEFAULT_OUT = "runs/visor-weights"


@click.command("train-visor")
@model_option
@click.option("--steps", default=500, show_default=True, type=click.IntRange(0),
              help="Optimiser steps of the cross-attention blocks (one sampled budget per step); 0 = keep the "
                   "blocks of --init and fit only the policy.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Questions per step.")
@click.option("--policy-samples", default=320, show_default=True, type=click.IntRange(2),
              help="Questions labelled for the budget policy.")
@click.option("--seed", default=0, show_default=True, type=int, help="Data order, budget draws and init.")
@click.option("--init", default=None, type=click.Path(),
              help="VISOR weights to start from (their blocks; the policy is always fit anew).")
@click.option("--tiny", is_flag=True, help="Seconds-scale settings for tests and smoke runs (overrides the above).")
@click.option("--out", "out_dir", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
              help="Directory for visor.safetensors and visor.json (files replaced atomically).")
@calibration_data_options
@device_option
def train_visor(model, steps, batch_size, policy_samples, seed, init, tiny, out_dir, data, images, coco, device):
    """Train one set of cross-attention blocks over all budgets, then the per-sample budget policy.

    Use the result with `--method visor:weights=OUT` (budget=K or budget=policy). Deterministic for a seed on CPU.
    """
    from mmkit.errors import MmkitError
    from mmkit.evals.calibration_data import describe_source, user_samples
    from mmkit.pruning.visor_train import TINY, VisorTrainConfig
    from mmkit.pruning.visor_train import train_visor as run

    settings = dict(steps=steps, batch_size=batch_size, policy_samples=policy_samples, seed=seed)
    if tiny:
        settings.update(TINY)
    try:
        cfg = VisorTrainConfig(**settings)
    except ValueError as err:
        raise MmkitError(str(err)) from None
    # Short-answer questions only (no captions), as on the world; the files are checked before the model loads.
    items = user_samples(data, images, coco, seed=seed, kinds_excluded=("caption",))
    _, report = run(model, cfg, out_dir=out_dir, device=device, init=init, data=items,
                    data_source=describe_source(data, images, coco))
    seconds = report["seconds"]
    click.echo(f"saved {out_dir}/visor.safetensors (blocks {seconds['blocks']} s, policy labels "
               f"{seconds['policy_labels']} s)")
    policy = report["policy"]
    val = policy.get("val", policy.get("train", {}))
    click.echo(json.dumps({
        "final_ce_by_budget": report["blocks"]["final_ce_by_budget"],
        "label_sufficient_rate": {k: round(v, 3) for k, v in policy["label_sufficient_rate"].items()},
        "policy_mean_budget": round(val.get("mean_budget", float("nan")), 3),
        "policy_answer_kept_rate": round(val.get("answer_kept_rate", float("nan")), 3),
    }))
