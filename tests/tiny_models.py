"""Tiny local models and tokenizers for tests, built from scratch (nothing downloaded); data they learn, and
helpers to set up or stop a training run on them."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kto_lite.runs import RunDir, prepare_output_dir
from kto_lite.training.recipe import Recipe

WORDS = ("the a is are what how why who where when yes no good bad answer question cat dog bird fish red blue "
         "green one two three four five six seven eight nine ten plus minus equals apple pear tree house car "
         "road river sun moon star sky day night hot cold big small fast slow up down left right ok fine "
         "great poor alpha beta gamma delta kappa sigma omega zeta theta lambda : ? . ,").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% if m['role'] == 'assistant' %}"
    "{{ eos_token }} {% endif %}{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path: Path, *, seed: int = 0, chat_template: bool = True) -> Path:
    """A random 2-layer Llama (hidden 64: a 4-bit block size) with a word-level tokenizer, saved to `path`."""
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


COLORS = "red blue green big small hot cold fast slow".split()
THINGS = "cat dog bird fish apple pear tree house car".split()


def learnable_rows(n: int, *, seed: int, held_out: bool = False, desirable_only: bool = False) -> list[dict]:
    """prompt/completion/label rows where desirable answers differ from undesirable ones in a learnable way.

    Train prompts use the first six things, held-out prompts the last three, so a test on held-out
    prompts measures generalisation, not memorisation.
    """
    import random

    rng = random.Random(seed)
    things = THINGS[6:] if held_out else THINGS[:6]
    rows = []
    for i in range(n):
        prompt = f"what is the {rng.choice(COLORS)} {rng.choice(things)} ?"
        good = desirable_only or i % 2 == 0
        completion = "yes good answer ." if good else f"no bad answer . {rng.choice(COLORS)}"
        rows.append({"prompt": prompt, "completion": completion, "label": good})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def make_arch_model_dir(path: Path, model_type: str = "llama", *, seed: int = 0) -> Path:
    """A random 2-layer model of `model_type` (llama, mistral, qwen2, gemma2) with a byte-level BPE tokenizer.

    For the GGUF export: its tokenizer is one llama.cpp knows (GPT-2 style BPE, with a chat template).
    Gemma-2 keeps its default head_dim 256 and query_pre_attn_scalar 256, as the real models have.
    """
    from conftest import CHAT_TEMPLATE, build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(CHAT_TEMPLATE, eos_token="<|end|>")
    # vocab padded past the tokenizer (as real models pad theirs; transformers' Qwen2 tokenizer adds a token)
    sizes = dict(vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if model_type != "gemma2":
        sizes["head_dim"] = 16
    config = AutoConfig.for_model(model_type, **sizes, tie_word_embeddings=model_type in ("qwen2", "gemma2"))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases too, so a wrong mapping of them shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(0.0 if name.endswith(".bias") else 1.0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def stop_at_step(step: int):
    """A stand-in for Recipe._stop_requested that asks for a graceful stop after optimizer step `step` (as
    Ctrl-C would): patch it in with monkeypatch.setattr(Recipe, "_stop_requested", stop_at_step(3))."""
    calls = {"n": 0}

    def stop_requested(self) -> bool:
        calls["n"] += 1
        return calls["n"] == step

    return stop_requested


def make_training_dir(root: Path) -> Path:
    """`root` with a tiny model (root/model) and 32 rows it can learn (root/train.jsonl)."""
    make_model_dir(Path(root) / "model")
    write_jsonl(Path(root) / "train.jsonl", learnable_rows(32, seed=0))
    return Path(root)


def make_recipe(cfg):
    """A set-up recipe (data, model, reference log-probs, optimizer) for `cfg`, without running the loop."""
    cfg = cfg.resolved()
    prepare_output_dir(cfg)
    recipe = Recipe(cfg, Accelerator(cpu=True), RunDir(cfg.output_dir), show_progress=False)
    recipe.setup()
    return recipe
