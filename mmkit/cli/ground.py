"""`mmkit ground`: VL-SAM grounding of one image; writes an overlay, attention heat maps and COCO JSON."""

import json

import click

from mmkit.cli.options import device_option, dtype_option, model_option


@click.command()
@model_option
@click.option("--image", "image", required=True, help="Path to a PNG/JPEG image.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for <stem>_overlay.png, <stem>_attn_<label>.png and <stem>_coco.json.")
@click.option("--sam", default=None, help="SAM checkpoint directory or hub id (default: the shipped small SAM).")
@click.option("--query", default=None, help="Ground only this object (default: every object the model lists).")
@click.option("--multi-scale/--single-scale", default=None,
              help="Also map the four corner crops (5 views), or only the full image (default: on in both "
                   "presets).")
@click.option("--refine", default=2, show_default=True, type=click.IntRange(0, 2),
              help="Refinement rounds: 1 feeds the mask back, 2 also resamples the points inside it.")
@click.option("--prompt", "prompts", multiple=True,
              help="Object-listing question (repeatable: a question ensemble). Default: the preset's (paper: ten "
                   "questions; reference: the detailed and the brief question).")
@click.option("--preset", default="auto", show_default=True, type=click.Choice(["auto", "paper", "reference"]),
              help="VL-SAM settings: paper (as published) or reference (best on the reference model); auto picks "
                   "reference for --model reference.")
@device_option
@dtype_option
def ground(model, image, out_dir, sam, query, multi_scale, refine, prompts, preset, device, dtype):
    """Find and segment the objects in IMAGE from the model's attention, with Segment Anything."""
    from pathlib import Path

    import mmkit
    from mmkit.errors import MmkitError
    from mmkit.grounding.outputs import write_outputs
    from mmkit.grounding.sam_backend import load_sam
    from mmkit.grounding.vlsam import auto_preset, ground as run_ground, preset_config
    from mmkit.images import load_image

    picture = load_image(image)  # fail on a bad image before loading any model
    if query is not None and not query.strip():
        raise MmkitError("--query is empty; pass the object to ground, e.g. --query cup")
    kwargs = {"refine_steps": refine}
    if multi_scale is not None:
        kwargs["multi_scale"] = multi_scale
    if prompts:
        kwargs["describe_prompts"] = tuple(prompts)
    backend = load_sam(sam, device=device)  # a bad --sam fails before the LVLM is loaded
    session = mmkit.load(model, device=device, dtype=dtype)
    try:
        cfg = preset_config(auto_preset(session) if preset == "auto" else preset, **kwargs)
    except ValueError as err:
        raise MmkitError(str(err)) from None
    result = run_ground(session, backend, [picture], query=query, config=cfg)[0]
    paths = write_outputs(picture, result, out_dir, stem=Path(image).stem)
    for d in result.detections:
        click.echo(f"{d.label}\tbox={list(d.box)}\tscore={d.score:.3f}\tarea={int(d.mask.sum())}")
    if not result.detections:
        click.echo("no objects found", err=True)
    click.echo(json.dumps({"answers": result.answers, "outputs": paths,
                           **{k: round(v, 3) for k, v in result.stats.items()}}), err=True)
