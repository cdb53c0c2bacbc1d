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


def _overridden(tmp_path, data: dict, overrides: list[str]):
    """What the stages read (load_params) and what DVC records (ruamel, YAML 1.2) from
    params.yaml while `overrides` are written into it by the flow (flows.pipeline)."""
    from ruamel.yaml import YAML

    from flows.pipeline import params_overridden

    path = tmp_path / "params.yaml"
    path.write_text("# the project's params\n" + yaml.safe_dump(data, sort_keys=False))
    before = path.read_text()
    with params_overridden(path, overrides):
        read, dvc = load_params(path), YAML(typ="safe").load(path.read_text())
    assert path.read_text() == before   # put back as it was
    return read, dvc


def test_the_flow_writes_the_validated_values_that_the_stage_reads_back(tmp_path):
    data = yaml.safe_load(open("params.yaml"))
    overrides = ["tracking.experiment=2024", "tracking.registered_model=no",
                 "agent.openai.model=1.10", "pretrain.min_lr=1e-5", "pretrain.steps=70"]
    read, dvc = _overridden(tmp_path, data, overrides)
    assert read == apply_overrides(load_params("params.yaml"), overrides)
    # was `experiment: 2024`: the stage failed "Input should be a valid string"; `no` a boolean
    assert read.tracking.experiment == dvc["tracking"]["experiment"] == "2024"
    assert read.tracking.registered_model == dvc["tracking"]["registered_model"] == "no"
    assert read.agent.openai.model == dvc["agent"]["openai"]["model"] == "1.10"   # not 1.1
    assert read.pretrain.min_lr == dvc["pretrain"]["min_lr"] == 1e-5
    assert yaml.safe_load(yaml.safe_dump(dvc))["pretrain"]["steps"] == 70


def test_a_section_missing_from_the_file_is_written_as_validated(tmp_path):
    data = yaml.safe_load(open("params.yaml"))
    data["rl"].pop("tasks")
    read, dvc = _overridden(tmp_path, data, ["rl.tasks.output=1.0"])
    want = dict(apply_overrides(parse_params(data), ["rl.tasks.output=1.0"]).rl.tasks)
    assert want["output"] == 1.0 and len(want) == 2   # the other kind keeps its default
    # was {'output': 1.0}: the stage ran (and dvc.lock recorded) another config than validated
    assert read.rl.tasks == dvc["rl"]["tasks"] == want
