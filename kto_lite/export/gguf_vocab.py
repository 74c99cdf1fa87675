"""A tokenizer as GGUF metadata: the vocabulary, token types, merges or scores, special ids, chat template.

Two tokenizer families cover the supported architectures, as llama.cpp names them:
- "gpt2": byte-level BPE (Llama-3, Qwen2, SmolLM, the demo model). llama.cpp needs the name of the
  pre-tokenizer (how text is split before BPE); it is recognised from tokenizer.json's structure.
- "llama": sentencepiece-style BPE with byte fallback (Llama-2, Mistral, Gemma). llama.cpp merges by
  token score; a merge's rank in tokenizer.json gives that order (score = -rank).
Special token ids, add_bos/add_eos, merges and the chat template come from `gguf.SpecialVocab`, the
package's own reader of a tokenizer folder. A base that was a GGUF file keeps its tokenizer as it was.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

from kto_lite.errors import UnsupportedModel

# Split regexes of the pre-tokenizers llama.cpp knows by name (its llama-vocab.cpp); tokenizer.json spells
# them the same way.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _steps(tokenizer_json: dict) -> list[dict]:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre else []


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text, or UnsupportedModel."""
    steps = _steps(tokenizer_json)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own regex (llama.cpp spells this one with a hyphen)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
            return "qwen2"
    raise UnsupportedModel(f"the tokenizer's pre-tokenizer ({json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}) "
                           "is not one the GGUF export recognises (GPT-2, SmolLM, Llama-3, Qwen2); a GGUF "
                           "with the wrong one would split text differently from training")


def adds_space_prefix(tokenizer_json: dict) -> bool:
    """Sentencepiece style: does the tokenizer put "▁" before the text (Llama-2, Mistral: yes; Gemma: no)?"""
    for step in _steps(tokenizer_json):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
    normalizer = tokenizer_json.get("normalizer") or {}
    parts = normalizer.get("normalizers", [normalizer])
    return any(p.get("type") == "Prepend" for p in parts)


def _merge_pairs(tokenizer_json: dict) -> list[tuple[str, str]]:
    merges = tokenizer_json["model"].get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def vocab_lists(tokenizer, tokenizer_json: dict, n_vocab: int, kind: str) -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) for ids 0..n_vocab-1; ids the tokenizer lacks become unused "[PAD<id>]"."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= n_vocab:
        raise UnsupportedModel(f"the tokenizer has token id {max(reverse)}, the model only {n_vocab} embeddings")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    scores = {}
    if kind == "llama":  # merge order as score: llama.cpp merges the highest-scoring pair first
        for rank, (a, b) in enumerate(_merge_pairs(tokenizer_json)):
            scores.setdefault(a + b, -float(rank))
    tokens, types, token_scores = [], [], []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            if i in added:
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            elif i == tokenizer.unk_token_id:
                types.append(gguf.TokenType.UNKNOWN)
            elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        # a multi-character token no merge makes must not win over the merges (-1e6: merged last)
        token_scores.append(scores.get(token, 0.0 if token is None or len(token) == 1 else -1e6))
    return tokens, types, token_scores


def adds_special(tokenizer) -> tuple[bool, bool]:
    """Does the tokenizer put BOS before / EOS after plain text? Asked of the tokenizer itself."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def add_tokenizer(writer, tokenizer, config, *, base_gguf: str | None = None) -> None:
    """Write the tokenizer's metadata. `base_gguf`: copy the tokenizer of that GGUF file unchanged."""
    import gguf

    if base_gguf:
        copy_tokenizer(writer, base_gguf)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise UnsupportedModel("the tokenizer has no tokenizer.json (a slow tokenizer); GGUF needs a fast one")
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        model_type = tokenizer_json["model"]["type"]
        if model_type != "BPE":
            raise UnsupportedModel(f"a {model_type} tokenizer cannot be written as GGUF here (BPE only: "
                                   "byte-level like Llama-3/Qwen2, or sentencepiece-style like Llama-2/Gemma)")
        kind = "llama" if tokenizer_json["model"].get("byte_fallback") else "gpt2"
        tokens, types, scores = vocab_lists(tokenizer, tokenizer_json, config.vocab_size, kind)
        writer.add_tokenizer_model(kind)
        if kind == "gpt2":
            writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer_json))
        else:
            writer.add_tokenizer_pre("default")
            writer.add_add_space_prefix(adds_space_prefix(tokenizer_json))
            writer.add_token_scores(scores)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        quiet = logging.getLogger("gguf.vocab")  # its notes on post-processor shapes are not the user's business
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            special = gguf.SpecialVocab(tmp, load_merges=kind == "gpt2", n_vocab=len(tokens))
        finally:
            quiet.setLevel(level)
        special.add_special_token["bos"], special.add_special_token["eos"] = adds_special(tokenizer)
        special.add_to_gguf(writer, quiet=True)


def copy_tokenizer(writer, base_gguf: str) -> None:
    """Every tokenizer.* key of another GGUF file, with its type."""
    import gguf

    reader = gguf.GGUFReader(base_gguf)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
