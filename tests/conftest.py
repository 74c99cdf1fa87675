"""Shared test fixtures: tiny tokenizers built locally and data files written in every format.

Nothing is downloaded: the tokenizers are trained here on a few sentences with the `tokenizers` library.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / datasets are imported anywhere
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import csv  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# --- tiers (markers registered in pyproject.toml) ---

TIERS = ("slow", "browser", "multiprocess", "real_model")


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook applies `-m`
def pytest_collection_modifyitems(items):
    """Mark every test that is in none of the TIERS `fast`: `python -m pytest -m fast` is the inner loop."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session", autouse=True)
def _reference_cache(tmp_path_factory):
    """Reference log-prob caches go to a fresh folder per test session, never to the user's ~/.cache."""
    os.environ["KTO_LITE_CACHE"] = str(tmp_path_factory.mktemp("kto_lite_cache"))

# --- tokenizers ---

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = [
    "hello world, how are you today?",
    "the cat sat on the mat and the dog sat on the log.",
    "a good answer is short and correct; a bad answer is long and wrong.",
    "what is the capital of france? paris is the capital of france.",
    "write a poem about the sea. the sea is blue and deep.",
    "question answer prompt completion label yes no true false",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
]
# ChatML-like: <s><|user|>hi<|end|>\n<|assistant|>hello<|end|>\n ; a reply ends with <|end|> (= EOS) + "\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@functools.cache
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def build_tokenizer(chat_template: str | None = None, eos_token: str = "</s>"):
    """A fresh byte-level BPE tokenizer (vocab 400, BOS <s> added to plain text, no pad token)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>",
        eos_token=eos_token,
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture
def tiny_tokenizer():
    """No chat template; BOS <s>, EOS </s>, no pad token."""
    return build_tokenizer()


@pytest.fixture
def chat_tokenizer():
    """CHAT_TEMPLATE, EOS = <|end|> (the end-of-turn token, as in instruct models), no pad token."""
    return build_tokenizer(CHAT_TEMPLATE, eos_token="<|end|>")


# --- data files ---

FILE_TYPES = ("jsonl", "json", "csv", "parquet", "dataset")


def write_rows(tmp_path: Path, rows: list[dict], fmt: str, name: str = "data") -> Path:
    """Write rows as `fmt` (one of FILE_TYPES) and return the path (a folder for "dataset").

    CSV cells that hold lists or dicts are written as JSON, the way people export them.
    """
    if fmt == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    elif fmt == "csv":
        path = tmp_path / f"{name}.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                )
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "dataset":
        import datasets

        datasets.disable_progress_bars()
        path = tmp_path / name
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(f"unknown fmt {fmt!r}; use one of {FILE_TYPES}")
    return path
