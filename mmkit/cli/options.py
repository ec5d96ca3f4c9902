"""Options shared by several commands."""

import click

DEFAULT_MODEL = "reference"

model_option = click.option(
    "--model", "model", default=DEFAULT_MODEL, show_default=True,
    help="Built-in name (reference, tiny-random, tiny-random-qwen2.5-vl, ...), local directory, or hub id of a "
         "LLaVA, LLaVA-NeXT, LLaVA-OneVision or Qwen2/2.5/3-VL checkpoint.",
)
method_option = click.option(
    "--method", "methods", multiple=True, metavar="SPEC",
    help="Method to apply, e.g. fastv:layer=2,keep=0.25 (repeatable; see `mmkit methods`).",
)
device_option = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
dtype_option = click.option("--dtype", default=None, help="float32, float16 or bfloat16 (default: the checkpoint's).")
attn_option = click.option(
    "--attn-implementation", "attn_implementation", default=None,
    type=click.Choice(["sdpa", "eager", "flex_attention", "flash_attention_2"]),
    help="Attention implementation to load the model with (default: transformers' choice, usually sdpa).",
)


def calibration_data_options(fn):
    """--data / --images / --coco of `mmkit eval`, for commands that calibrate or train on samples."""
    fn = click.option("--coco", default=None,
                      help="Draw samples from a COCO directory (descriptions and existence questions from its "
                           "annotations) instead of the reference world.")(fn)
    fn = click.option("--images", default=None, help="Image directory of --data.")(fn)
    fn = click.option("--data", default=None,
                      help="Draw samples from a POPE question file / lmms-eval POPE parquet or VQA JSON lines "
                           "instead of the reference world.")(fn)
    return fn
