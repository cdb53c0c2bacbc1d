"""`SECTION.KEY=VALUE` overrides (codeworld/overrides.py): read as params.yaml would be."""
import pytest
import yaml

from codeworld.config import ConfigError, load_params, parse_params
from codeworld.overrides import apply_overrides


def test_a_text_field_takes_a_number_like_value_as_text():
    p = apply_overrides(load_params("params.yaml"), ["tracking.experiment=2024",
                                                     "pretrain.steps=70"])
    assert p.tracking.experiment == "2024"   # was refused: "Input should be a valid string"
    assert p.pretrain.steps == 70            # numbers stay numbers


def test_an_optional_section_left_out_is_made_from_its_defaults():
    data = yaml.safe_load(open("params.yaml"))
    data.pop("sft")
    data["rl"]["init_from"] = "midtrain"   # (rl starts from sft by default)
    p = parse_params(data, "params.yaml")
    assert p.sft is None
    q = apply_overrides(p, ["sft.steps=40", "sft.init_from=midtrain"])
    assert q.sft.steps == 40 and q.sft.init_from == "midtrain"   # was "'sft' is not a section"


def test_a_bad_override_is_still_refused_naming_it():
    p = load_params("params.yaml")
    with pytest.raises(ConfigError, match="pretrain.steps"):
        apply_overrides(p, ["pretrain.steps=abc"])
    with pytest.raises(ConfigError, match="'experiment' is not a section"):
        apply_overrides(p, ["tracking.experiment.x=1"])
