"""`mmkit train-reference`: train the reference model on the reference world, from scratch or continuing from
earlier weights (the shipped ones with `--init reference`), with resumable checkpoints."""

import json
from pathlib import Path

import click

# Not the shipped directory: retraining must not silently replace the embedded model; pass --out to do that.
DEFAULT_OUT = "runs/reference-model"


def default_checkpoint_dir(out_dir: str) -> str:
    """Where checkpoints go unless --checkpoint-dir says otherwise: next to the output, never inside it (the
    output directory is replaced when the run ends)."""
    out = Path(out_dir)
    return str(out.with_name(out.name + "-checkpoints"))


def _init_source(value: str | None, option: str = "--init") -> str | None:
    """--init / --vision-from: "reference" names the shipped weights; anything else must be an existing path."""
    if value is None:
        return None
    from mmkit.errors import MmkitError

    if value == "reference":
        from mmkit.models.builtin import REFERENCE_DIR

        value = str(REFERENCE_DIR)
    if not Path(value).exists():
        raise MmkitError(f"{option} {value}: no such file or directory (give an HF model directory, a .safetensors "
                         "snapshot, or 'reference' for the shipped weights)")
    return value


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
@click.option("--eval-scenes", default=None, type=click.IntRange(0),
              help="Held-out scenes per evaluation (POPE); 0 skips every evaluation, the final one included.")
@click.option("--eval-captions", default=None, type=click.IntRange(0), help="Held-out captions per evaluation.")
@click.option("--log-every", default=None, type=click.IntRange(1), help="Log losses every N steps.")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0.1),
              help="Stop early (and save) once this much wall time is spent.")
@click.option("--stop-at", default=None, type=click.IntRange(1), help="Stop after this step (schedule unchanged).")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--warmup", default=None, type=click.IntRange(0), help="Linear warm-up steps.")
@click.option("--init", "init_from", default=None, metavar="DIR|FILE|reference",
              help="Continue from these weights (HF directory, snapshot .safetensors, or 'reference' for the shipped "
                   "model) instead of from scratch. Weights with fewer tokens get new embedding rows appended.")
@click.option("--scene-offset", default=None, type=click.IntRange(0),
              help="Shift the training scenes (a continued run then sees new scenes).")
@click.option("--snapshots", default=None, type=click.Path(file_okay=False),
              help="Also save the weights at every evaluation here (fp16 safetensors).")
@click.option("--captions", "caption_mix", type=click.Choice(["legacy", "detailed"]), default=None,
              help="Caption mix: legacy (the shipped recipe, short captions for 'Describe the image in detail.') or "
                   "detailed (detailed captions for that prompt, short ones for 'Describe the image briefly.'). "
                   "[default: legacy]")
@click.option("--detailed-share", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="With --captions detailed: thin each scene's other questions so that detailed captions are this "
                   "fraction of the instruct stream [default: keep all, about 1 in 12].")
@click.option("--keep-pope", is_flag=True, default=None,
              help="With --detailed-share: never thin the POPE questions; the other questions are thinned harder.")
@click.option("--caption-noise", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="With --captions detailed: the probability that a training detailed caption names one absent "
                   "co-occurrence partner, as GPT-written detailed descriptions do [default: 0, exact truth].")
@click.option("--caption-noise-place", type=click.Choice(["sentence", "relation", "partner"]), default=None,
              help="Where --caption-noise names an absent object: the scene's strongest absent co-occurrence "
                   "partner as one more object sentence at a random place (sentence) or in place of the second "
                   "object of the last relation sentence (relation); or, in every relation sentence whose first "
                   "object's group partner is absent, that partner in place of the second object (partner). "
                   "[default: sentence]")
@click.option("--pope-negatives", default=None, metavar="random|mixed|SPLIT=W,...",
              help="With --captions detailed: the splits the training POPE questions' negatives come from, one per "
                   "scene: random (the shipped recipe), mixed (random, popular or adversarial, equal odds), or "
                   "weighted splits such as random=1,adversarial=1. [default: random]")
@click.option("--answer-loss", type=click.Choice(["token", "sample"]), default=None,
              help="Mean the answer loss over all answer tokens of a batch (token, the shipped recipe) or per answer "
                   "first (sample, so a long caption weighs as much as a yes/no answer). [default: token]")
@click.option("--vision-from", default=None, metavar="DIR|FILE|reference",
              help="Take the vision tower alone from these weights (after --init), e.g. 'reference' for the shipped "
                   "tower under a continued language model.")
@click.option("--freeze-vision", is_flag=True,
              help="Keep the vision tower fixed (no gradient, no patch loss); needs 0 vision-phase steps.")
@click.option("--checkpoint-every", default=None, type=click.IntRange(0),
              help="Write a resumable checkpoint every N steps (0: only when --max-minutes or --stop-at ends the run).")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False),
              help="Checkpoint directory [default: OUT-checkpoints next to --out].")
@click.option("--resume", is_flag=True,
              help="Continue from the checkpoint in the checkpoint directory (same settings); starts at step 0 if "
                   "there is none.")
def train_reference(out_dir, seed, tiny, device, steps, batch, workers, eval_every, eval_scenes, eval_captions,
                    log_every, max_minutes, stop_at, lr, warmup, init_from, scene_offset, snapshots, caption_mix,
                    detailed_share, keep_pope, caption_noise, caption_noise_place, pope_negatives, answer_loss,
                    vision_from, freeze_vision, checkpoint_every, checkpoint_dir, resume):
    """Train mmkit's reference LLaVA model and save it as an HF directory.

    Deterministic for a seed on CPU (a resumed run included); prints the held-out POPE F1 per split and CHAIR_S at
    the end.
    """
    import logging

    from mmkit.errors import MmkitError
    from mmkit.world.train import TINY_CONFIG, TrainConfig, config_with_steps, train

    logging.getLogger("mmkit.world.train").setLevel(logging.INFO)
    overrides = {"seed": seed}
    init_from = _init_source(init_from)
    vision_from = _init_source(vision_from, "--vision-from")
    for name, value in (("batch", batch), ("num_workers", workers), ("eval_every", eval_every),
                        ("eval_scenes", eval_scenes), ("eval_captions", eval_captions), ("log_every", log_every),
                        ("max_minutes", max_minutes), ("stop_at", stop_at), ("lr", lr), ("warmup_steps", warmup),
                        ("init_from", init_from), ("scene_offset", scene_offset), ("caption_mix", caption_mix),
                        ("detailed_share", detailed_share), ("keep_pope", keep_pope),
                        ("caption_noise", caption_noise), ("caption_noise_place", caption_noise_place),
                        ("pope_negatives", pope_negatives), ("answer_loss", answer_loss),
                        ("vision_from", vision_from), ("freeze_vision", freeze_vision),
                        ("checkpoint_every", checkpoint_every)):
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
    checkpoints = checkpoint_dir or default_checkpoint_dir(out_dir)
    try:
        _, _, log = train(cfg, out_dir=out_dir, device=device, snapshot_dir=snapshots, checkpoint_dir=checkpoints,
                          resume=resume)
    except ValueError as err:
        raise MmkitError(str(err)) from None
    final = log[-1]
    evals = [e for e in log if e.get("eval")]
    click.echo(f"saved {out_dir} ({final['step']} steps, {final['samples']} samples, {final['seconds']} s on "
               f"{final['device']})")
    if final.get("stopped_early"):
        click.echo(f"stopped early at step {final['step']}; the checkpoint in {checkpoints} continues it with "
                   "the same command plus --resume (without the limit that stopped it)")
    if evals:
        last = evals[-1]
        click.echo(json.dumps({"pope_f1": {s: round(m["f1"], 4) for s, m in last["pope"].items()},
                               "chair_s": round(last["chair_s"], 4)}))
