"""TrainConfig: YAML + command-line flags, validation messages, defaults and derived defaults."""

import dataclasses

import pytest
import yaml

from kto_lite.commands import main
from kto_lite.commands.train import train_config
from kto_lite.config import DEFAULT_BETA, DEFAULT_LEARNING_RATE, TrainConfig, field_help
from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SETTINGS
from kto_lite.errors import ConfigError

DESIGN_FIELDS = """model data output_dir load_in_4bit lora_r lora_alpha lora_dropout lora_target_modules beta
desirable_weight undesirable_weight loss_type learning_rate num_epochs max_steps batch_size
gradient_accumulation_steps max_length max_prompt_length precompute_reference gradient_checkpointing seed
logging_steps save_steps eval_data resume_from_checkpoint mixed_precision trust_remote_code revision
attn_implementation init_adapter reference report_to push_to_hub hub_private""".split()


def test_contract_field_names_exist_with_help():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(DESIGN_FIELDS) <= names
    assert all(len(h) > 10 for h in field_help().values())


def test_paper_defaults():
    c = TrainConfig(model="someone/some-model", data="x.jsonl").resolved()
    # weights 'auto': 1.0 and 1.0 on balanced labels (the paper's default), its eq. 8 otherwise
    assert (c.beta, c.desirable_weight, c.undesirable_weight, c.loss_type) == (DEFAULT_BETA, "auto", "auto", "kto")
    assert c.learning_rate == DEFAULT_LEARNING_RATE and c.beta == 0.1
    assert c.load_in_4bit and c.gradient_checkpointing and c.precompute_reference
    assert c.batch_size >= 4 and 16 <= c.batch_size * c.gradient_accumulation_steps <= 128


def test_demo_model_gets_its_own_settings_unless_set():
    for model in (None, str(DEMO_MODEL_DIR)):
        c = TrainConfig(model=model).resolved()
        assert (c.beta, c.learning_rate) == (DEMO_SETTINGS["beta"], DEMO_SETTINGS["learning_rate"])
    assert TrainConfig(beta=0.2, learning_rate=1e-5).resolved().beta == 0.2  # a value the user set wins
    assert TrainConfig(beta=0.2, learning_rate=1e-5).resolved().learning_rate == 1e-5
    assert TrainConfig().resolved().data.endswith("demo_kto.jsonl")


def test_defaults_are_derived_from_what_was_set():
    """A default never contradicts a value the user gave (issue: `--max_length 256` alone was refused)."""
    c = train_config(["--max_length", "256"]).resolved()
    assert (c.max_length, c.max_prompt_length) == (256, 128)
    assert train_config(["--max_length", "512"]).resolved().max_prompt_length == 256
    assert TrainConfig().resolved().max_prompt_length == TrainConfig().max_length // 2
    assert TrainConfig(lora_r=64).resolved().lora_alpha == 128
    assert TrainConfig(lora_r=64, lora_alpha=16).resolved().lora_alpha == 16
    assert TrainConfig(lr_scheduler_type="constant").resolved().warmup_ratio == 0.0
    assert TrainConfig(lr_scheduler_type="cosine").resolved().warmup_ratio == 0.1
    assert TrainConfig(lr_scheduler_type="constant", warmup_ratio=0.3).resolved().warmup_ratio == 0.3
    # resolving twice changes nothing; the resolved config round-trips through YAML
    c = TrainConfig(max_length=64).resolved()
    assert c.resolved() == c


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.3, "lora_r": 8, "data": "x.jsonl"}))
    c = train_config([str(path), "--beta", "0.2", "--learning-rate", "2e-5", "--desirable_weight", "auto",
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
    ({"mixed_precision": "fp8"}, "not one of auto, bf16, fp16, no"),
    ({"reference": "init_adapter"}, "needs init_adapter"),
])
def test_invalid_values_have_clear_messages(values, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(values)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.load(tmp_path / "list.yaml")


def test_command_line_errors_exit_2_with_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--betta", "0.1"])
    assert e.value.code == 2 and "did you mean --beta?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--beta"])  # a flag without its value
    assert e.value.code == 2
    assert main(["train", "--beta", "high"]) == 2 and "beta: expected float" in capsys.readouterr().err
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_every_command_spells_a_field_flag_the_same_way(tmp_path, capsys):
    """`data --max_length 16` works like `train --max_length 16` (issue 11)."""
    from kto_lite.commands.data import main as data_main

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2.", "label": true}\n')
    assert data_main([str(path), "--model", str(DEMO_MODEL_DIR), "--max_length", "16"]) == 0
    assert "max_length=16, max_prompt_length=8" in capsys.readouterr().out
    assert data_main([str(path), "--max_length", "16"]) == 2  # nothing to tokenize with: said, not ignored
    assert "needs --model" in capsys.readouterr().err
