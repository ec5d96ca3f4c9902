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
def generate(model, image, prompt, methods, max_new_tokens, sample, seed, device, dtype, attn_implementation,
             as_json):
    """Answer PROMPT about IMAGE, with optional methods; prints the answer and efficiency stats."""
    import mmkit
    from mmkit.images import load_image

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
