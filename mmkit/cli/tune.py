"""`mmkit tune`: calibrate methods whose hyper-parameters are searched per model and token budget."""

import click

from mmkit.cli.options import calibration_data_options, device_option, dtype_option, model_option


@click.group("tune")
def tune():
    """Search a method's hyper-parameters on calibration data and save them."""


@tune.command("vflowopt")
@model_option
@click.option("--budget", type=float, required=True,
              help="Mean share of visual tokens per decoder layer, e.g. 0.25.")
@click.option("--out", "out", required=True, help="JSON file to write; load it with --method vflowopt:config=PATH.")
@click.option("--seed", type=int, default=0, show_default=True, help="Search seed (same seed, same result).")
@click.option("--samples", type=int, default=16, show_default=True, help="Calibration samples.")
@click.option("--trials", type=int, default=32, show_default=True, help="Configurations evaluated.")
@click.option("--startup-trials", type=int, default=None,
              help="Random configurations before TPE takes over [default: a third of --trials, at most 27].")
@click.option("--paper-budget", is_flag=True,
              help="The official search budget: 300 trials, 27 of them random (overrides --trials/--startup-trials).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@calibration_data_options
@device_option
@dtype_option
def vflowopt(model, budget, out, seed, samples, trials, startup_trials, paper_budget, batch_size, data, images, coco,
             device, dtype):
    """Tune VFlowOpt for a token budget by minimising the change of the last prompt token's final hidden state
    (optuna TPE search; needs the `tune` extra).

    Calibration samples come from the reference world unless --data or --coco is given."""
    import mmkit
    from mmkit.errors import MmkitError
    from mmkit.evals.calibration_data import describe_source, user_samples
    from mmkit.tuning.vflowopt import PAPER_STARTUP_TRIALS, PAPER_TRIALS, save_config, tune_vflowopt

    if paper_budget:
        trials, startup_trials = PAPER_TRIALS, PAPER_STARTUP_TRIALS
    items = user_samples(data, images, coco, n=samples, seed=seed)  # files are checked before the model loads
    calibration = None if items is None else ([it.image for it in items], [it.prompt for it in items])
    session = mmkit.load(model, device=device, dtype=dtype)

    def progress(trial, distance, best):
        click.echo(f"trial {trial + 1}/{trials}: distance {distance:.5f} (best {best:.5f})", err=True)

    try:
        config, record = tune_vflowopt(session, budget, samples=samples, trials=trials, seed=seed,
                                       batch_size=batch_size, startup_trials=startup_trials, progress=progress,
                                       calibration=calibration)
    except ValueError as err:
        raise MmkitError(str(err)) from None
    record["calibration_data"] = describe_source(data, images, coco) or "reference world"
    save_config(out, config, record, model)
    keep = "/".join(f"{k:.4f}" for k in config.llm_keep)
    click.echo(f"vflowopt for budget {budget}: vision_keep={config.vision_keep:.4f} threshold={config.threshold:.2f} "
               f"merge_cell={config.merge_cell:.3f} entropy_weight={config.entropy_weight:.3f} "
               f"llm_layers={'/'.join(map(str, config.llm_layers))} llm_keep={keep}; "
               f"distance {record['distance']:.5f}")
    click.echo(f"wrote {out}; use --method vflowopt:config={out}", err=True)


@tune.command("paint-heads")
@model_option
@click.option("--out", "out", required=True,
              help="safetensors file to write; use it with --method paint:heads=calibrated,sensitivity=PATH.")
@click.option("--samples", type=int, default=32, show_default=True, help="Calibration prompts (with --data/--coco).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample order (with --data/--coco).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@calibration_data_options
@device_option
@dtype_option
def paint_heads(model, out, samples, seed, batch_size, data, images, coco, device, dtype):
    """Calibrate PAINT's per-head visual sensitivity (image attention mass at the answer position) and save it.

    Without --data/--coco this is PAINT's built-in calibration on reference-world scenes."""
    import mmkit
    from mmkit.evals.calibration_data import user_samples
    from mmkit.hallucination import head_sensitivity

    items = user_samples(data, images, coco, n=samples, seed=seed)
    session = mmkit.load(model, device=device, dtype=dtype)
    if items is None:
        mass = head_sensitivity.builtin_calibration(session)
    else:
        mass = head_sensitivity.calibrate(session, [it.image for it in items], [it.prompt for it in items],
                                          batch_size=batch_size)
    head_sensitivity.save(mass, out)
    source = "the reference world" if items is None else f"{len(items)} samples of {data or coco}"
    click.echo(f"calibrated {mass.shape[0]} layers x {mass.shape[1]} heads on {source}", err=True)
    click.echo(f"wrote {out}; use --method paint:heads=calibrated,sensitivity={out}", err=True)
