"""Package a trained adapter: a zip of the adapter folder, or a model with the adapter merged in.

Merging reloads the base in full precision and adds the LoRA update to its weights. It never merges
into the 4-bit weights the adapter was trained on: rounding the merged weights back to 4 bits would
lose most of the small LoRA update, and a merged 4-bit checkpoint is not a portable format anyway.
The merge runs on the CPU (RAM, not GPU memory: the GPU may be busy with a chat model or training).

`python -m kto_lite export --adapter DIR (--zip OUT.zip | --merge OUT_DIR)` (`main`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import torch

from .chat import adapter_base, check_adapter_dir

# What a zip holds: the adapter, its tokenizer, and the run's record. Not checkpoints/ (optimizer
# state, several times the adapter's size), not the feedback or any data file.
ZIP_PATTERNS = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",  # peft
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "vocab.*",
    "merges.txt", "*.model", "generation_config.json",  # tokenizer
    "config.yaml", "metrics.jsonl", "data_report.json", "status.json",  # the run
)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


# --------------------------------------------------------------------------- zip


def zip_adapter(adapter_dir: str | Path, out_zip: str | Path) -> Path:
    """Write the adapter, tokenizer, config.yaml and metrics/report of a run into one zip.

    Files go under a folder named after the run, so unzipping gives a folder that
    `PeftModel.from_pretrained` loads.
    """
    adapter_dir = check_adapter_dir(adapter_dir)
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and any(fnmatch(p.name, g) for g in ZIP_PATTERNS))
    folder = adapter_dir.resolve().name or "adapter"
    fd, tmp = tempfile.mkstemp(suffix=".zip.partial", dir=out_zip.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for path in files:
                z.write(path, f"{folder}/{path.name}")
        os.replace(tmp, out_zip)  # a reader never sees half a zip
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_zip


# --------------------------------------------------------------------------- merge


def merge_dtype(dtype: str = "auto") -> torch.dtype:
    """auto: bf16 when the GPU has it (the adapter was trained in bf16), else fp32."""
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def estimate_merge_memory(base: str | None, dtype: str = "auto") -> int:
    """Bytes of RAM a merge needs: the base's parameters at `dtype`, plus ~20% for loading and saving.

    Counts the parameters from the model's config on the meta device: nothing is loaded.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(base))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    return int(n * torch.finfo(merge_dtype(dtype)).bits // 8 * 1.2)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None,
                  dtype: str = "auto") -> Path:
    """Reload the base unquantized at `dtype`, merge the adapter into it, save it (safetensors) + tokenizer.

    base None: the adapter's own base (the run's config.yaml, else adapter_config.json). Refuses an
    out_dir that has anything in it. Writes to a temporary sibling folder first, so a failed merge
    leaves nothing half-written at out_dir.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import load_tokenizer

    adapter_dir = check_adapter_dir(adapter_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder for the merged model")
    base = base or adapter_base(adapter_dir)
    torch_dtype = merge_dtype(dtype)
    if getattr(AutoConfig.from_pretrained(base), "quantization_config", None):
        raise ValueError(f"{base} is a quantized checkpoint; merging needs the full-precision base it was "
                         "made from: give it with --base / base=")

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()  # W += scale * B @ A
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter_dir) if has_tokenizer else base)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)  # safetensors, sharded when large
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


# --------------------------------------------------------------------------- how to load the result


def load_snippet(path: str | Path, kind: str, *, base: str | None = None) -> str:
    """The Python lines that load an exported result and answer one message.

    kind "adapter": the base plus the adapter folder (peft); the base is `base`, else the one the
    adapter at `path` names. kind "merged": a merged model folder.
    """
    if kind == "adapter" and base is None:
        base = adapter_base(path) if (Path(path) / "adapter_config.json").is_file() else "BASE_MODEL"
    path = str(path)
    if kind == "adapter":
        load = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=\"auto\", device_map=\"auto\")\n"
            f"model = PeftModel.from_pretrained(base, {path!r})  # the LoRA adapter on top of its base\n"
            "# or in one line: peft.AutoPeftModelForCausalLM.from_pretrained(adapter folder)\n"
        )
    elif kind == "merged":
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=\"auto\", device_map=\"auto\")\n"
        )
    else:
        raise ValueError(f"kind {kind!r}: use 'adapter' or 'merged'")
    return load + (
        f"tokenizer = AutoTokenizer.from_pretrained({path!r})\n\n"
        "messages = [{\"role\": \"user\", \"content\": \"Hello!\"}]\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
        "                                       return_dict=True).to(model.device)\n"
        "output = model.generate(**inputs, max_new_tokens=128)\n"
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n"
    )


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kto_lite export",
                                description="Zip a trained adapter, or merge it into a full-precision base.")
    p.add_argument("--adapter", required=True, help="a training run's output_dir (or any PEFT adapter folder)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--zip", metavar="OUT.zip", help="write the adapter, tokenizer and run record to a zip")
    what.add_argument("--merge", metavar="OUT_DIR", help="write a merged model (safetensors) to a new folder")
    p.add_argument("--base", help="base model to merge into (default: the one the adapter was trained on)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="precision of the merged model; auto: bf16 on bf16 GPUs, else fp32")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        if args.zip:
            out = zip_adapter(args.adapter, args.zip)
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)\n\nload it (after unzipping):\n")
            folder = Path(args.adapter).resolve().name
            print(load_snippet(folder, "adapter", base=args.base or adapter_base(args.adapter)))
            return 0
        check_adapter_dir(args.adapter)
        base = args.base or adapter_base(args.adapter)
        print(f"merging {args.adapter} into {base} ({merge_dtype(args.dtype)}, on CPU)", flush=True)
        try:
            print(f"this needs about {estimate_merge_memory(base, args.dtype) / 2**30:.1f} GiB of RAM", flush=True)
        except (OSError, ValueError) as e:  # no config.json reachable: the merge itself will say more
            print(f"(could not estimate the memory needed: {e})", flush=True)
        out = merge_adapter(args.adapter, args.merge, base=base, dtype=args.dtype)
        print(f"wrote {out}\n\nload it:\n")
        print(load_snippet(out, "merged"))
        return 0
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
