import json
import platform

import click


@click.command()
@click.option("--preset", type=click.Choice(["llava-1.5-7b", "llava-next-7b", "llava-onevision-7b", "qwen2.5-vl-7b",
                                             "tiny", "tiny-next", "tiny-onevision", "tiny-qwen2.5-vl"]),
              default="llava-1.5-7b", show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="Prefill batch size.")
@click.option("--method", "methods", multiple=True, metavar="SPEC",
              help="Method(s) to time against the baseline (default: fastv:layer=2,keep=0.1).")
@click.option("--cases", default="prefill,generate", show_default=True,
              help="Comma list of prefill, generate, max-batch, kernels.")
@click.option("--device", default=None, help="cuda (default when available) or cpu.")
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--reps", type=int, default=5, show_default=True)
@click.option("--json-out", default=None, help="Also write the rows as JSON to this path.")
def bench(preset, batch, methods, cases, device, dtype, reps, json_out):
    """Time prefill / generation at real model sizes with random weights, methods against the baseline."""
    import torch

    import transformers

    from mmkit import speed as b
    from mmkit.registry import parse_spec
    from mmkit.models.loading import resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    methods = list(methods) or ["fastv:layer=2,keep=0.1"]
    wanted = {c.strip() for c in cases.split(",") if c.strip()}
    unknown = wanted - {"prefill", "generate", "max-batch", "kernels"}
    if unknown:
        raise click.BadParameter(f"unknown case(s) {', '.join(sorted(unknown))}", param_hint="--cases")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    click.echo(f"device {name} | torch {torch.__version__} | transformers {transformers.__version__} | "
               f"{dtype} | preset {preset}")
    model = b.build_random_model(preset, dev, torch_dtype)
    rows = []
    if "prefill" in wanted:
        rows += b.prefill_case(model, preset, batch, methods, reps=reps)
    if "generate" in wanted:
        rows += b.generate_case(model, preset, methods, reps=max(1, reps // 2))
    if "max-batch" in wanted:
        if dev.type != "cuda":
            raise click.BadParameter("max-batch needs a CUDA device", param_hint="--cases")
        rows += b.max_batch_case(model, preset, methods)
    click.echo(b.format_rows(rows))
    from mmkit.pruning.fastv import FastVConfig

    for spec in methods:
        cfg = parse_spec(spec)
        if isinstance(cfg, FastVConfig):  # the token-FLOP bound is FastV's formula (one drop layer, one share)
            click.echo(f"token-FLOP bound for {spec}: {b.flop_bound(model, preset, cfg.layer, cfg.keep):.2f}x")
    if "kernels" in wanted:
        from mmkit.kernels.speed import time_kernels

        for row in time_kernels(device=str(dev)):
            click.echo(json.dumps(row))
    if json_out:
        from mmkit.atomic import atomic_write_json

        atomic_write_json(json_out, [dict(r.__dict__, speedup=r.speedup) for r in rows])
