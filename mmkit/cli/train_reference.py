"""`mmkit train-reference`: train the reference model from scratch on the reference world."""

import json

import click

# Not the shipped directory: retraining must not silently replace the embedded model; pass --out to do that.
DEFAULT_OUT = "runs/reference-model"


@click.command("train-reference")
@click.option("--out", "out_dir", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
              help="Directory to write the HF model to (replaced if it exists).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of initialisation and data order.")
@click.option("--tiny", is_flag=True, help="Train a very small model (144 visual tokens) in under a minute on CPU.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Where to train (default: cuda if available).")
@click.option("--steps", default=None, metavar="V,A,I|N",
              help="Optimiser steps of the vision, align and instruct phases, or one total split 1:1:6.")
@click.option("--batch", default=None, type=click.IntRange(1), help="Batch size of the align and instruct phases.")
@click.option("--workers", default=None, type=click.IntRange(0), help="Data-generating worker processes.")
@click.option("--eval-every", default=None, type=click.IntRange(0), help="Held-out evaluation every N steps (0: end).")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0.1),
              help="Stop early (and save) once this much wall time is spent.")
@click.option("--stop-at", default=None, type=click.IntRange(1), help="Stop after this step (schedule unchanged).")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--warmup", default=None, type=click.IntRange(0), help="Linear warm-up steps.")
@click.option("--init", "init_from", default=None, type=click.Path(exists=True),
              help="Continue from these weights (HF directory or snapshot .safetensors) instead of from scratch.")
@click.option("--scene-offset", default=None, type=click.IntRange(0),
              help="Shift the training scenes (a continued run then sees new scenes).")
@click.option("--snapshots", default=None, type=click.Path(file_okay=False),
              help="Also save the weights at every evaluation here (fp16 safetensors).")
def train_reference(out_dir, seed, tiny, device, steps, batch, workers, eval_every, max_minutes, stop_at, lr, warmup,
                    init_from, scene_offset, snapshots):
    """Train mmkit's reference LLaVA model from scratch and save it as an HF directory.

    Deterministic for a seed on CPU; prints the held-out POPE F1 per split and CHAIR_S at the end.
    """
    import logging

    from mmkit.errors import MmkitError
    from mmkit.world.train import TINY_CONFIG, TrainConfig, config_with_steps, train

    logging.getLogger("mmkit.world.train").setLevel(logging.INFO)
    overrides = {"seed": seed}
    for name, value in (("batch", batch), ("num_workers", workers), ("eval_every", eval_every),
                        ("max_minutes", max_minutes), ("stop_at", stop_at), ("lr", lr), ("warmup_steps", warmup),
                        ("init_from", init_from), ("scene_offset", scene_offset)):
        if value is not None:
            overrides[name] = value
    try:
        cfg = config_with_steps(TINY_CONFIG if tiny else TrainConfig(), steps, **overrides)
    except ValueError as err:
        raise MmkitError(str(err)) from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MmkitError("--device cuda asked for, but CUDA is not available here; use --device cpu")
    _, _, log = train(cfg, out_dir=out_dir, device=device, snapshot_dir=snapshots)
    final = log[-1]
    evals = [e for e in log if e.get("eval")]
    click.echo(f"saved {out_dir} ({final['step']} steps, {final['samples']} samples, {final['seconds']} s on "
               f"{final['device']})")
    if evals:
        last = evals[-1]
        click.echo(json.dumps({"pope_f1": {s: round(m["f1"], 4) for s, m in last["pope"].items()},
                               "chair_s": round(last["chair_s"], 4)}))
