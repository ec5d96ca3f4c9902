import dataclasses

import click


@click.command()
@click.option("--fields", is_flag=True, help="Also list each method's settings and defaults.")
def methods(fields):
    """List registered methods with kind and a one-line description."""
    from mmkit.registry import list_methods

    rows = list_methods()
    name_w = max(len(m.name) for m in rows)
    kind_w = max(len(m.kind) for m in rows)
    click.echo(f"{'method':<{name_w}}  {'kind':<{kind_w}}  description")
    for m in rows:
        click.echo(f"{m.name:<{name_w}}  {m.kind:<{kind_w}}  {m.description}")
        if fields:
            does = ", ".join(name.replace("_", " ") for name in m.capabilities.names()) or "nothing in the model"
            click.echo(f"{'':<{name_w}}    capabilities: {does}")
            for f in dataclasses.fields(m.config_cls):
                help_text = f.metadata.get("help", "")
                click.echo(f"{'':<{name_w}}    {f.name}={f.default!r}  {help_text}")
