"""Turn a paired preference dataset from the Hub into a data file kto_lite trains on directly.

    python recipes/prepare_ultrafeedback.py --max-rows 20000 --out data/ultrafeedback_kto.jsonl
    python -m kto_lite train recipes/ultrafeedback_binarized.yaml

Default source: HuggingFaceH4/ultrafeedback_binarized, split train_prefs (~61k prompts, each with a
chosen and a rejected assistant reply rated by GPT-4). Any dataset with the same columns works
(`--dataset`, `--split`). This needs network access to the Hugging Face Hub: it cannot run in
kto_lite's offline CI, where tests check `to_paired_row` on rows built in memory.

Each written line is {"prompt": [messages before the reply], "chosen": "...", "rejected": "..."},
the paired format kto_lite reads as is (docs/data.md): every pair becomes one desirable and one
undesirable example with the same prompt. Pairs whose scores tie carry no preference and are
skipped, as are pairs whose two conversations do not share their prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path


def to_paired_row(row: dict, min_score_gap: float = 0.0) -> dict | None:
    """One dataset row -> {"prompt", "chosen", "rejected"}, or None when it holds no usable preference.

    `chosen` / `rejected` are either conversations ([{"role", "content"}, ...] ending with the
    assistant's reply, UltraFeedback's layout) or plain strings next to a string `prompt`.
    """
    chosen, rejected = row["chosen"], row["rejected"]
    gap = (row.get("score_chosen") or 0.0) - (row.get("score_rejected") or 0.0)
    if "score_chosen" in row and "score_rejected" in row and (gap <= 0 or gap < min_score_gap):
        return None  # a tie (or an inverted pair) is not a preference
    if isinstance(chosen, list) and isinstance(rejected, list):
        if not chosen or not rejected or chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
            return None
        if chosen[:-1] != rejected[:-1]:
            return None  # the two replies answer different conversations
        prompt = [{"role": m["role"], "content": m["content"]} for m in chosen[:-1]]
        chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    else:
        prompt = row.get("prompt")
    if not prompt or not chosen or not rejected or chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_pairs(rows: Iterable[dict], out: Path, *, max_rows: int | None = None, min_score_gap: float = 0.0) -> tuple[int, int]:
    """Convert and write `rows` as JSON lines. Returns (written, skipped)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            if max_rows is not None and written >= max_rows:
                break
            pair = to_paired_row(row, min_score_gap)
            if pair is None:
                skipped += 1
                continue
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
            written += 1
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="HuggingFaceH4/ultrafeedback_binarized")
    parser.add_argument("--split", default="train_prefs")
    parser.add_argument("--out", type=Path, default=Path("data/ultrafeedback_kto.jsonl"))
    parser.add_argument("--max-rows", type=int, default=None, help="stop after this many pairs (default: all)")
    parser.add_argument("--min-score-gap", type=float, default=0.0,
                        help="skip pairs whose chosen score beats the rejected one by less (ties are always skipped)")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed, so --max-rows takes a random sample")
    args = parser.parse_args(argv)

    import datasets  # only here: the conversion above needs no download

    data = datasets.load_dataset(args.dataset, split=args.split).shuffle(seed=args.seed)
    written, skipped = write_pairs(data, args.out, max_rows=args.max_rows, min_score_gap=args.min_score_gap)
    print(f"wrote {written} pairs ({2 * written} KTO examples) to {args.out}; skipped {skipped} rows")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
