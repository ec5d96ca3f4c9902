"""The shipped artefacts are part of the product: a checkout without them is broken, not a reason to skip."""

import json

import pytest

from mmkit.models.shipped import ARTEFACTS, WEIGHTS_DIR, missing_artefacts, shipped_dir


def test_every_shipped_artefact_is_installed():
    assert missing_artefacts() == []


def test_shipped_artefacts_are_found_through_one_module():
    from mmkit.grounding.sam_backend import shipped_sam_dir
    from mmkit.models.builtin import REFERENCE_DIR
    from mmkit.pruning.dyvte import SHIPPED_DIR as DYVTE_DIR
    from mmkit.pruning.vflowopt import SHIPPED_TUNED
    from mmkit.pruning.visor import SHIPPED_DIR as VISOR_DIR

    assert [REFERENCE_DIR, shipped_sam_dir(), DYVTE_DIR, VISOR_DIR, SHIPPED_TUNED] == \
        [shipped_dir(n) for n in ("reference", "sam", "dyvte", "visor", "vflowopt")]
    assert all(shipped_dir(n).parent == WEIGHTS_DIR for n in ARTEFACTS)
    with pytest.raises(KeyError, match="no shipped artefact"):
        shipped_dir("clip")


def test_missing_artefact_is_reported(tmp_path, monkeypatch):
    import mmkit.models.shipped as shipped

    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    assert shipped.missing_artefacts() == list(ARTEFACTS)


@pytest.mark.parametrize("name", ["reference-0.5", "reference-0.25", "reference-0.1"])
def test_shipped_vflowopt_configs_are_readable(name):
    data = json.loads((shipped_dir("vflowopt") / f"{name}.json").read_text())
    assert data["method"] == "vflowopt"
