import click

from mmkit.cli.options import device_option, dtype_option, method_option, model_option


@click.command()
@model_option
@method_option
@click.option("--out", "out", required=True, help="Directory to create (must not exist or be empty).")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
@click.option("--remote-code", is_flag=True,
              help="Also make it load with plain transformers (trust_remote_code=True), methods attached.")
@device_option
@dtype_option
def export(model, methods, out, overwrite, remote_code, device, dtype):
    """Write a model directory with its methods pre-configured; `mmkit.load(DIR)` reproduces it exactly."""
    from pathlib import Path

    import mmkit
    from mmkit.errors import MmkitError

    if Path(out).exists() and not Path(out).is_dir():
        raise MmkitError(f"--out {out} is a file; an export is a directory, pick a new --out")
    session = mmkit.load(model, methods=list(methods), device=device, dtype=dtype)
    path = session.save_pretrained(out, overwrite=overwrite, remote_code=remote_code)
    click.echo(f"wrote {path} ({', '.join(h.spec for h in session.methods) or 'no methods'})")
