from dataclasses import dataclass

import pytest

from mmkit.errors import MmkitError
from mmkit.pruning.fastv import FastVConfig
from mmkit.registry import config_from_dict, config_to_dict, config_to_spec, get_method, list_methods, parse_spec, register_method


def test_fastv_is_registered():
    names = [m.name for m in list_methods()]
    assert "fastv" in names
    assert get_method("fastv").kind == "pruning"


def test_parse_spec_types_and_defaults():
    cfg = parse_spec("fastv:layer=3,keep=0.25")
    assert cfg == FastVConfig(layer=3, keep=0.25)
    assert parse_spec("fastv") == FastVConfig()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch", "unknown method"),
        ("fastv:depth=2", "no field 'depth'"),
        ("fastv:layer=two", "must be an integer"),
        ("fastv:keep=1.5", "keep must be in (0, 1]"),
        ("fastv:keep=0", "keep must be in (0, 1]"),
        ("fastv:layer=0", "layer must be an integer >= 1"),
        ("fastv:layer", "must look like field=value"),
        ("", "empty"),
    ],
)
def test_parse_spec_errors(spec, message):
    with pytest.raises(MmkitError, match=None) as err:
        parse_spec(spec)
    assert message in str(err.value)


def test_spec_and_dict_round_trip():
    cfg = FastVConfig(layer=3, keep=0.25)
    assert parse_spec(config_to_spec(cfg)) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_spec(FastVConfig()) == "fastv"


def test_register_rejects_bad_names_and_kinds():
    @dataclass
    class Cfg:
        x: int = 1

    with pytest.raises(ValueError):
        register_method("Bad-Name", Cfg, lambda s, c: None, kind="pruning")
    with pytest.raises(ValueError):
        register_method("okname", Cfg, lambda s, c: None, kind="magic")


def test_capabilities_follow_from_slots_and_the_contract_is_checked_at_apply(session):
    from dataclasses import dataclass

    from mmkit.registry import _REGISTRY, get_method, register_method

    assert get_method("fastv").capabilities.drops_tokens
    assert get_method("visionzip").capabilities.acts_before_llm
    assert get_method("paint").capabilities.edits_attention and get_method("paint").capabilities.needs_calibration
    assert get_method("vcd").capabilities.branches_logits and not get_method("vcd").capabilities.drops_tokens

    @dataclass
    class BrokenConfig:
        """A method that promises branches it does not implement."""

    class Impl:
        removed = False

        def remove(self):
            Impl.removed = True

    register_method("broken_branches", BrokenConfig, lambda s, c: Impl(), kind="hallucination",
                    slots=("logit_branches",))
    try:
        with pytest.raises(TypeError, match="declares branches_logits"):
            session.apply(BrokenConfig())
        assert Impl.removed and not session.methods
    finally:
        _REGISTRY.pop("broken_branches")
    with pytest.raises(ValueError, match="unknown slots"):
        register_method("bad_slot", BrokenConfig, lambda s, c: Impl(), kind="pruning", slots=("no_such",))
