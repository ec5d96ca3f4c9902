import json

import click

from mmkit.cli.options import device_option, dtype_option, model_option


@click.command()
@model_option
@device_option
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model, device, dtype, as_json):
    """Architecture, image-token layout, visual tokens, dtype and device of a model."""
    import mmkit

    description = mmkit.load(model, device=device, dtype=dtype).describe()
    if as_json:
        click.echo(json.dumps(description))
        return
    width = max(len(k) for k in description)
    for key, value in description.items():
        if key == "prompt_layout":
            value = repr(value)
        click.echo(f"{key:<{width}}  {value}")
