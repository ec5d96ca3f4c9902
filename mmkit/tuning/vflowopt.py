"""Tuning VFlowOpt's hyper-parameters for a model and a token budget (the paper's "visual information flow"
optimisation): `tune_vflowopt` searches, `save_config` writes the JSON that `vflowopt:config=PATH` loads.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from mmkit.pruning.vflowopt import _TUNED_FIELDS, VFlowOptConfig, visual_share


def calibration_set(samples: int, world_seed: int = 2) -> tuple[list, list[str]]:
    """Images and prompts from the reference world (a seed neither trained on nor evaluated): half POPE
    questions, half VQA questions, scene by scene."""
    from mmkit.evals.benches import select_questions
    from mmkit.world.scenes import generate_scene

    half = (samples + 1) // 2
    questions = select_questions("pope", "random", world_seed, half) + select_questions("vqa", "all", world_seed,
                                                                                        samples - half)
    scenes = {}
    images = []
    for q in questions:
        if q.scene_index not in scenes:
            scenes[q.scene_index] = generate_scene(world_seed, q.scene_index).image
        images.append(scenes[q.scene_index])
    return images, [q.prompt for q in questions]


def _last_hidden(session, batches) -> torch.Tensor:
    """Final hidden state of each row's last prompt token (the first answer step), float32."""
    captured = []
    lm = session.adapter.language_model

    def hook(module, args, kwargs, output):
        captured.append(output.last_hidden_state[:, -1].float())

    handle = lm.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for inputs in batches:
                session.model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return torch.cat(captured)


def _search_space(budget: float) -> dict[str, tuple[float, float]]:
    return {
        "vision_keep": (budget, min(1.0, 1.5 * budget)),
        "first_keep": (0.5, 1.0),
        "threshold": (0.0, 50.0),
        "merge_cell": (0.1, 1.0),
        "entropy_weight": (-1.0, 1.0),
    }


def _to_config(point: dict[str, float], budget: float, stage_layers: tuple[int, ...], num_layers: int,
               model: str) -> VFlowOptConfig | None:
    """The configuration for a search point, the last stage's keep solved to meet the budget (None: infeasible)."""
    keeps = [point["first_keep"]] * (len(stage_layers) - 1)
    base = visual_share(point["vision_keep"], stage_layers, keeps + [1.0], num_layers)
    after = num_layers - stage_layers[-1]
    share_before_last = point["vision_keep"] * math.prod(keeps)
    last = 1.0 - (base - budget) * num_layers / (after * share_before_last)
    if not 0.02 <= last <= 1.0:
        return None
    return VFlowOptConfig(vision_keep=point["vision_keep"], threshold=point["threshold"],
                          merge_cell=point["merge_cell"], entropy_weight=point["entropy_weight"],
                          llm_layers=stage_layers, llm_keep=tuple(keeps + [last]), tuned_for=model or "untitled model")


# The official search: scikit-optimize with 300 calls, 27 of them random initial points.
PAPER_TRIALS = 300
PAPER_STARTUP_TRIALS = 27

# Objective value told to the sampler for a point whose last-stage keep cannot meet the budget (the largest
# cosine distance there is), so it learns to avoid that region without a forward.
_INFEASIBLE = 2.0


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError("tuning vflowopt needs optuna: pip install 'mmkit-vlm[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def tune_vflowopt(session, budget: float, samples: int = 16, trials: int = 32, seed: int = 0, batch_size: int = 8,
                  stages: int = 2, startup_trials: int | None = None,
                  calibration: tuple[list, list[str]] | None = None, progress=None
                  ) -> tuple[VFlowOptConfig, dict[str, Any]]:
    """Search VFlowOpt's hyper-parameters for `budget` (mean visual-token share over decoder layers).

    Objective: mean cosine distance between the last prompt token's final hidden state with and without
    pruning, over the calibration set (the official objective sums the cosine similarities; same optimum).
    Sampler: optuna's TPE (multivariate), seeded, with `startup_trials` random points first (default: a third of
    the trials, at most 27); `trials=PAPER_TRIALS, startup_trials=PAPER_STARTUP_TRIALS` is the official budget.
    `trials` counts evaluated settings: points that cannot meet the budget are told a penalty and redrawn.
    Deterministic for a seed. Returns the best configuration and a record of the search.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if samples < 1 or trials < 1 or batch_size < 1 or stages < 1:
        raise ValueError("samples, trials, batch_size and stages must be >= 1")
    if startup_trials is None:
        startup_trials = max(1, min(PAPER_STARTUP_TRIALS, trials // 3))
    if startup_trials < 1:
        raise ValueError(f"startup_trials must be >= 1, got {startup_trials}")
    if session.methods:
        raise ValueError("tune on a session without methods applied")
    optuna = _optuna()
    num_layers = session.adapter.num_layers
    stage_layers = VFlowOptConfig(llm_keep=(1.0,) * stages).stage_layers(num_layers)
    images, prompts = calibration if calibration is not None else calibration_set(samples)
    batches = [session.prepare(images[i:i + batch_size], prompts[i:i + batch_size])
               for i in range(0, len(prompts), batch_size)]
    reference = _last_hidden(session, batches)
    space = _search_space(budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE is "experimental"
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    history: list[dict[str, Any]] = []
    best: tuple[float, VFlowOptConfig] | None = None
    infeasible = 0
    while len(history) < trials:
        trial = study.ask()
        point = {name: trial.suggest_float(name, lo, hi) for name, (lo, hi) in space.items()}
        config = _to_config(point, budget, stage_layers, num_layers, session.source or "")
        if config is None:
            study.tell(trial, _INFEASIBLE)
            infeasible += 1
            if infeasible > 50 * trials:
                raise ValueError(f"no feasible vflowopt setting reaches budget {budget} on this model")
            continue
        handle = session.apply(config)
        try:
            pruned = _last_hidden(session, batches)
        finally:
            handle.remove()
        distance = float((1.0 - torch.nn.functional.cosine_similarity(pruned, reference, dim=-1)).mean())
        study.tell(trial, distance)
        history.append({"trial": len(history), "distance": distance, **{k: round(v, 6) for k, v in point.items()},
                        "llm_keep": list(config.llm_keep)})
        if best is None or distance < best[0]:
            best = (distance, config)
        if progress is not None:
            progress(len(history) - 1, distance, best[0])
    distance, config = best
    record = {"budget": budget, "objective": "mean cosine distance of the last prompt token's final hidden state",
              "distance": distance, "samples": len(prompts), "trials": trials, "startup_trials": startup_trials,
              "infeasible_draws": infeasible, "sampler": f"optuna {optuna.__version__} TPESampler(multivariate)",
              "seed": seed,
              "achieved_share": visual_share(config.vision_keep, config.llm_layers, config.llm_keep, num_layers),
              "history": history}
    return config, record


def config_document(config: VFlowOptConfig, record: dict[str, Any], model: str) -> dict[str, Any]:
    """The JSON document `vflowopt:config=PATH` reads."""
    values = {name: getattr(config, name) for name in _TUNED_FIELDS + ("positions",)}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return {"method": "vflowopt", "config": values, "model": model, "tuning": record}


def save_config(path, config: VFlowOptConfig, record: dict[str, Any], model: str) -> None:
    """Write the tuned configuration atomically (temporary file, then rename)."""
    from mmkit.atomic import atomic_write_json

    atomic_write_json(path, config_document(config, record, model))


__all__ = ["tune_vflowopt", "save_config", "config_document", "calibration_set", "PAPER_TRIALS",
           "PAPER_STARTUP_TRIALS"]
