"""TrainConfig: YAML + CLI overrides, validation messages, defaults."""

import dataclasses

import pytest
import yaml

from kto_lite.config import ConfigError, TrainConfig, field_help, parse_overrides

DESIGN_FIELDS = """model data output_dir load_in_4bit lora_r lora_alpha lora_dropout lora_target_modules beta
desirable_weight undesirable_weight loss_type learning_rate num_epochs max_steps batch_size
gradient_accumulation_steps max_length max_prompt_length precompute_reference gradient_checkpointing seed
logging_steps save_steps eval_data resume_from_checkpoint""".split()


def test_contract_field_names_exist_with_help():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(DESIGN_FIELDS) <= names
    assert all(len(h) > 10 for h in field_help().values())


def test_paper_defaults():
    c = TrainConfig()
    assert (c.beta, c.desirable_weight, c.undesirable_weight, c.loss_type) == (0.1, 1.0, 1.0, "kto")
    assert c.load_in_4bit and c.gradient_checkpointing and c.precompute_reference
    assert c.batch_size >= 4 and 16 <= c.batch_size * c.gradient_accumulation_steps <= 128


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.3, "lora_r": 8, "data": "x.jsonl"}))
    c = TrainConfig.load(path, ["--beta", "0.2", "--learning-rate", "2e-5", "--desirable_weight", "auto",
                                "--lora_target_modules", "[q_proj, v_proj]", "--load_in_4bit=false"])
    assert (c.beta, c.lora_r, c.learning_rate, c.desirable_weight) == (0.2, 8, 2e-5, "auto")
    assert c.lora_target_modules == ["q_proj", "v_proj"] and c.load_in_4bit is False and c.data == "x.jsonl"


def test_round_trip_through_yaml(tmp_path):
    c = TrainConfig(beta=0.25, max_steps=10, undesirable_weight="auto")
    c.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == c


@pytest.mark.parametrize("values,message", [
    ({"betta": 0.1}, "did you mean 'beta'"),
    ({"beta": "high"}, "beta: expected float"),
    ({"beta": 0}, "beta must be > 0"),
    ({"batch_size": 1.5}, "batch_size: expected int"),
    ({"desirable_weight": "many"}, "number or 'auto'"),
    ({"loss_type": "dpo"}, "not one of kto, apo_zero_unpaired"),
    ({"max_length": 256, "max_prompt_length": 256}, "max_prompt_length (256) must be smaller"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"max_steps": 0}, "max_steps must be > 0"),
    ({"load_in_4bit": "maybe"}, "load_in_4bit: expected bool"),
])
def test_invalid_values_have_clear_messages(values, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(values)
    assert message in str(e.value)


def test_bad_files_and_flags(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.load(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--beta"])
    with pytest.raises(ConfigError, match="expected --field value"):
        parse_overrides(["beta", "0.1"])
