"""`mmkit train-sam`: train the small Segment Anything model on the reference world (CPU, minutes)."""

import json

import click

# Not the shipped directory: retraining must not silently replace the embedded model; pass --out to do that.
DEFAULT_OUT = "runs/sam-small"


@click.command("train-sam")
@click.option("--out", "out_dir", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
              help="Directory to write the HF SamModel to (replaced at every checkpoint).")
@click.option("--minutes", default=14.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Wall-time budget of the training loop.")
@click.option("--steps", default=1600, show_default=True, type=click.IntRange(1),
              help="Planned optimiser steps (length of the learning-rate schedule).")
@click.option("--batch", default=12, show_default=True, type=click.IntRange(1), help="Scenes per step.")
@click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(0),
              help="torch CPU threads (0: torch's default).")
@click.option("--init", "init_from", default=None, type=click.Path(exists=True, file_okay=False),
              help="Continue from this SamModel directory (e.g. an earlier --out) instead of from scratch.")
@click.option("--eval-scenes", default=100, show_default=True, type=click.IntRange(0),
              help="Held-out scenes (world seed 1) for the point-prompt mIoU after training (0: skip).")
def train_sam(out_dir, minutes, steps, batch, lr, seed, threads, init_from, eval_scenes):
    """Train the small SAM on reference-world masks with point prompts, then measure its held-out mIoU."""
    import logging
    from pathlib import Path

    from mmkit.errors import MmkitError
    from mmkit.atomic import atomic_write_json
    from mmkit.grounding.sam_backend import load_sam
    from mmkit.grounding.sam_train import SamTrainConfig, evaluate_point_miou, train_sam as run

    logging.getLogger("mmkit.grounding.sam_train").setLevel(logging.INFO)
    try:
        cfg = SamTrainConfig(max_minutes=minutes, steps=steps, batch_images=batch, lr=lr, seed=seed,
                             threads=threads, init_from=init_from or "", warmup=max(1, min(100, steps // 15)),
                             checkpoint_every=max(1, min(50, steps // 10)))
    except ValueError as err:
        raise MmkitError(str(err)) from None
    log = run(cfg, out_dir)
    click.echo(f"saved {out_dir} ({log['steps_done']} steps, {log['minutes']:.1f} min, {log['parameters']} params)")
    if eval_scenes:
        result = evaluate_point_miou(load_sam(out_dir, device="cpu"), world_seed=1, n_scenes=eval_scenes)
        atomic_write_json(Path(out_dir) / "eval_heldout.json", result)
        click.echo(json.dumps(result))
