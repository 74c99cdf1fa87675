"""TrainConfig: YAML + command-line flags, validation messages, defaults and derived defaults."""

import dataclasses
import json
import types
import typing

import pytest
import yaml

from kto_lite.commands import main
from kto_lite.commands.train import train_config
from kto_lite.config import DEFAULT_BETA, DEFAULT_LEARNING_RATE, TrainConfig, field_help
from kto_lite.demo import DEMO_MODEL_DIR, DEMO_SETTINGS
from kto_lite.errors import ConfigError

# The field names docs/design.md ("Config fields") promises to keep.
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
    """A default never contradicts a value the user gave: `--max_length 256` alone is accepted."""
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
    assert main(["train", "--betta", "0.1"]) == 2 and "did you mean --beta?" in capsys.readouterr().err
    assert main(["train", "--beta"]) == 2  # a flag without its value
    assert main(["train", "--beta", "high"]) == 2 and "beta: expected float" in capsys.readouterr().err
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_every_command_spells_a_field_flag_the_same_way(tmp_path, capsys):
    """`data --max_length 16` works like `train --max_length 16`."""
    from kto_lite.commands.data import main as data_main

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2.", "label": true}\n')
    assert data_main([str(path), "--model", str(DEMO_MODEL_DIR), "--max_length", "16"]) == 0
    assert "max_length=16, max_prompt_length=8" in capsys.readouterr().out
    assert data_main([str(path), "--max_length", "16"]) == 2  # nothing to tokenize with: said, not ignored
    assert "needs --model" in capsys.readouterr().err


# ---------------------------------------------------------------------- column mapping (`columns`, --column)
def test_columns_from_yaml_and_from_repeated_column_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("columns: {question: prompt, answer: completion}\n")
    assert TrainConfig.load(path).columns == {"question": "prompt", "answer": "completion"}
    c = train_config(["--column", "question=prompt", "--column", "rating=label"])
    assert c.columns == {"question": "prompt", "rating": "label"}
    # --column entries go on top of --columns; flags replace the YAML's mapping, as for any field
    c = train_config([str(path), "--columns", "{q: prompt}", "--column", "rating=label"])
    assert c.columns == {"q": "prompt", "rating": "label"}
    assert TrainConfig(columns="question=prompt, rating=label").columns == {"question": "prompt", "rating": "label"}
    assert TrainConfig(columns=None).columns == {} == TrainConfig().columns
    c = TrainConfig(columns={"question": "prompt"})
    c.save(tmp_path / "saved.yaml")
    assert TrainConfig.load(tmp_path / "saved.yaml") == c


@pytest.mark.parametrize("value,message", [
    ({"question": "promt"}, "column 'question' is mapped to 'promt', which is not one of prompt, completion, label"),
    ({"question": "promt"}, "did you mean 'prompt'?"),
    ({"q": "prompt", "question": "prompt"}, "columns 'q' and 'question' are both mapped to 'prompt'"),
    (["question", "prompt"], "columns: expected a mapping of file column to column name"),
    ("question", "columns: expected a mapping"),
])
def test_bad_column_mappings_are_refused_naming_the_field(value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(columns=value)
    assert message in str(e.value)


def test_column_flag_without_equals_is_refused(capsys):
    assert main(["train", "--column", "question"]) == 2
    assert "--column: 'question' is not NAME=CANONICAL" in capsys.readouterr().err


def test_a_changed_column_mapping_cannot_resume(tmp_path):
    """The mapping decides what the data is: it is part of what a checkpoint was trained on."""
    from kto_lite.runs import RESUME_MAY_CHANGE, check_resumable

    assert "columns" not in RESUME_MAY_CHANGE
    TrainConfig(columns={"question": "prompt"}).save(tmp_path / "config.yaml")
    check_resumable(tmp_path, TrainConfig(columns={"question": "prompt"}))
    with pytest.raises(ConfigError, match=r"columns \(checkpoint: \{'question': 'prompt'\}, now: \{'q': 'prompt'\}"):
        check_resumable(tmp_path, TrainConfig(columns={"q": "prompt"}))


# ---------------------------------------------------------------------- bad configurations, every field
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def wrong_value(name: str):
    """A value of the wrong type for the field (a choice field: a value that is not one of its choices)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    options = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    options.discard(type(None))
    if FIELDS[name].metadata.get("choices"):
        return "nonsense"
    if options == {bool}:
        return "maybe"
    if options & {int, float}:
        return "many"
    return 5  # fields that take text (or a list, or a mapping): a number


def refused(tmp_path, argv: list[str], capsys) -> str:
    """Run `train` (in tmp_path); it must exit 2 with one error message, before any work. Returns the message."""
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    return err


@pytest.mark.parametrize("source", ["yaml", "flag"])
@pytest.mark.parametrize("name", list(FIELDS))
def test_every_field_with_a_wrong_type_is_refused_naming_it(name, source, tmp_path, monkeypatch, capsys):
    """One clear message naming the field, exit 2; output_dir gets the failed status.json the app reads,
    and nothing else is written (output_dir itself mistyped: it cannot be named, so nothing at all)."""
    monkeypatch.chdir(tmp_path)
    value, out = wrong_value(name), tmp_path / "run"
    if source == "yaml":
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({name: value} | ({} if name == "output_dir" else
                                                                        {"output_dir": str(out)})))
        argv = ["c.yaml"]
    else:
        argv = [f"--{name}", str(value)] + ([] if name == "output_dir" else ["--output_dir", str(out)])
    err = refused(tmp_path, argv, capsys)
    assert name in err
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    if name == "output_dir":
        assert written == (["c.yaml"] if source == "yaml" else [])
        return
    assert written == sorted(["run", "run/status.json"] + (["c.yaml"] if source == "yaml" else []))
    status = json.loads((out / "status.json").read_text())
    assert (status["status"], status["phase"]) == ("failed", "checking config") and name in status["message"]


MUST_BE_POSITIVE = """lora_r lora_alpha beta batch_size gradient_accumulation_steps max_length max_prompt_length
logging_steps eval_steps num_epochs max_steps learning_rate save_total_limit humanline_sync_steps
eval_samples_per_prompt eval_max_new_tokens early_stopping_patience desirable_weight undesirable_weight
eval_top_p""".split()
MUST_NOT_BE_NEGATIVE = """save_steps weight_decay max_grad_norm seed warmup_ratio lora_dropout eval_fraction
eval_temperature""".split()
ANY_SIGN = ["log_epsilon_P", "log_epsilon_R", "judge_threshold"]  # bounds of a log-ratio, a judge's score


def test_every_numeric_field_says_which_values_it_takes():
    """A new number field is classified here, and so tested below."""
    hints = typing.get_type_hints(TrainConfig)
    numeric = {n for n, h in hints.items() if {int, float} & set(typing.get_args(h) or (h,)) and h is not bool}
    assert numeric == set(MUST_BE_POSITIVE + MUST_NOT_BE_NEGATIVE + ANY_SIGN)


@pytest.mark.parametrize("source", ["yaml", "flag"])
@pytest.mark.parametrize("name,value", [(n, v) for n in MUST_BE_POSITIVE for v in (0, -1)]
                         + [(n, -1) for n in MUST_NOT_BE_NEGATIVE])
def test_zero_or_negative_values_are_refused_naming_the_field(name, value, source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if source == "yaml":
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({name: value, "output_dir": "run"}))
        argv = ["c.yaml"]
    else:
        argv = [f"--{name}", str(value), "--output_dir", "run"]
    assert name in refused(tmp_path, argv, capsys)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["status.json"]


def test_a_refused_config_leaves_another_runs_folder_alone(tmp_path, capsys):
    out = tmp_path / "finished"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "status.json").write_text('{"status": "finished"}')
    refused(tmp_path, ["--beta", "high", "--output_dir", str(out)], capsys)
    assert json.loads((out / "status.json").read_text()) == {"status": "finished"}


@pytest.mark.parametrize("source", ["yaml", "flag"])
def test_an_unknown_name_is_refused_with_a_did_you_mean_and_a_failed_status(source, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if source == "yaml":
        (tmp_path / "c.yaml").write_text("betta: 0.1\noutput_dir: run\n")
        argv = ["c.yaml"]
    else:
        argv = ["--betta", "0.1", "--output_dir", "run"]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "betta" in err and "did you mean" in err and "beta" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["status.json"]
    assert "did you mean" in json.loads((tmp_path / "run" / "status.json").read_text())["message"]
