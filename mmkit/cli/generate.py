import json

import click

from mmkit.cli.options import attn_option, device_option, dtype_option, method_option, model_option


@click.command()
@model_option
@click.option("--image", "image", required=True, help="Path to a PNG/JPEG image.")
@click.option("--prompt", required=True, help="The question or instruction.")
@method_option
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling.")
@device_option
@dtype_option
@attn_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--show-kept", "show_kept", default=None, metavar="PATH.png",
              help="Also draw, over the image, the patches each decoder layer kept for this prompt (PNG).")
def generate(model, image, prompt, methods, max_new_tokens, sample, seed, device, dtype, attn_implementation,
             as_json, show_kept):
    """Answer PROMPT about IMAGE, with optional methods; prints the answer and efficiency stats."""
    from pathlib import Path

    import mmkit
    from mmkit.images import load_image

    if show_kept is not None and (Path(show_kept).suffix.lower() != ".png" or not Path(show_kept).parent.is_dir()):
        raise click.BadParameter(f"{show_kept} must be a .png path in an existing directory", param_hint="--show-kept")
    picture = load_image(image)  # fail on a bad image before spending time loading the model
    session = mmkit.load(model, methods=list(methods), device=device, dtype=dtype,
                         attn_implementation=attn_implementation)
    result = session.generate([picture], [prompt], max_new_tokens=max_new_tokens, do_sample=sample, seed=seed)[0]
    stats = result.stats
    record = {
        "text": result.text,
        "model": session.source,
        "methods": [h.spec for h in session.methods],
        "visual_tokens": stats.visual_tokens,
        "visual_tokens_kept": stats.mean_visual_tokens_kept,
        "visual_tokens_kept_per_layer": stats.visual_tokens_kept,
        "prefill_ms": round(stats.prefill_ms, 3),
        "new_tokens": stats.new_tokens,
    }
    if show_kept is not None:
        from mmkit.pruning.show_kept import draw_kept

        kept = draw_kept(session, picture, prompt, show_kept)
        record["show_kept"] = {"path": str(show_kept), "patches_kept_per_layer": kept.kept_counts()}
        if not as_json:
            click.echo(f"[kept patches per layer {kept.kept_counts()} drawn to {show_kept}]", err=True)
    if as_json:
        click.echo(json.dumps(record))
        return
    click.echo(result.text)
    click.echo(
        f"[visual tokens {stats.visual_tokens} -> kept {stats.mean_visual_tokens_kept:.1f} mean over layers | "
        f"prefill {stats.prefill_ms:.1f} ms | {stats.new_tokens} new tokens | methods: "
        f"{', '.join(record['methods']) or 'none'}]",
        err=True,
    )
