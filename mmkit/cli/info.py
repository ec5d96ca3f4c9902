import json

import click

from mmkit.cli.options import attn_option, device_option, dtype_option, model_option


@click.command()
@model_option
@device_option
@dtype_option
@attn_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model, device, dtype, attn_implementation, as_json):
    """Architecture, image-token layout, visual tokens, dtype and device of a model."""
    import mmkit

    description = mmkit.load(model, device=device, dtype=dtype, attn_implementation=attn_implementation).describe()
    if as_json:
        click.echo(json.dumps(description))
        return
    width = max(len(k) for k in description)
    for key, value in description.items():
        if key == "prompt_layout":
            value = repr(value)
        click.echo(f"{key:<{width}}  {value}")
