"""`mmkit world`: the reference world as files."""

import click


@click.group()
def world():
    """The reference world as files (COCO layout, POPE question files)."""


@world.command("export")
@click.option("--world-seed", type=int, default=1, show_default=True, help="World seed to write.")
@click.option("--out", "out", required=True, help="Directory to create (must not exist or be empty).")
@click.option("--images", "n_images", type=int, default=500, show_default=True, help="Scenes 0..N-1 to write.")
@click.option("--parquet", is_flag=True, help="Also write the POPE splits in lmms-eval's parquet layout (pyarrow).")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
def export_command(world_seed, out, n_images, parquet, overwrite):
    """Write a world seed as a COCO-layout directory (images, instances with boxes and masks, captions), POPE
    question files for the random, popular and adversarial splits, and a VQA file."""
    from mmkit.world.coco_export import export_world

    counts = export_world(out, world_seed=world_seed, n_images=n_images, parquet=parquet, overwrite=overwrite)
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
