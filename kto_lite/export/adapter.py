"""Ship a trained adapter: a zip, a merged model folder, a GGUF file (merged or LoRA), the Hub.

python -m kto_lite export --adapter RUN  (one of)
    --zip OUT.zip                 the adapter, tokenizer and run record
    --merge OUT_DIR               the merged model (safetensors), loadable without peft
    --gguf [--quant f16|q8_0]     the merged model as one GGUF file + an Ollama Modelfile
    --gguf_lora                   the adapter alone as a GGUF LoRA + a Modelfile (FROM base + ADAPTER)
  [--merge_from quantized|full] [--dtype ...] [--out FILE] [--push_to_hub REPO [--hub_private]]

Merges (merge.py) default to the faithful one for a 4-bit run: the update added to the
de-quantized 4-bit weights the adapter was trained against. The log says how far each merge is from
the trained model (mean |Δ log p| per token on rows of the run's data).
Files the user receives are created with the normal umask (not owner-only).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from kto_lite.export.gguf import base_config
from kto_lite.export.merge import merge, merge_dtype
from kto_lite.files import atomic_path
from kto_lite.model import resolve_model
from kto_lite.runs import adapter_base, check_adapter_dir, run_files

# --------------------------------------------------------------------------- zip


def zip_adapter(adapter_dir: str | Path, out_zip: str | Path) -> Path:
    """Write the adapter, tokenizer, config.yaml and metrics/report of a run into one zip.

    Files go under a folder named after the run, so unzipping gives a folder that
    `PeftModel.from_pretrained` loads.
    """
    adapter_dir = check_adapter_dir(adapter_dir)
    out_zip = Path(out_zip)
    folder = adapter_dir.resolve().name or "adapter"
    with atomic_path(out_zip) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in run_files(adapter_dir):
            z.write(path, f"{folder}/{path.name}")
    return out_zip


# --------------------------------------------------------------------------- merge


def estimate_merge_memory(base: str | None, dtype: str = "auto") -> int:
    """Bytes of RAM a merge needs: the base's parameters at `dtype`, plus ~20% for loading and saving.

    Counts the parameters from the model's config on the meta device: nothing is loaded.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM


    base = resolve_model(base)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(base_config(base))
    n = sum(p.numel() for p in model.parameters())
    return int(n * torch.finfo(merge_dtype(dtype, base)).bits // 8 * 1.2)


def save_merged(merged, out_dir: str | Path) -> Path:
    """A merged model (merge.Merged) as a transformers folder (safetensors + tokenizer).

    Refuses an out_dir that has anything in it. Writes to a temporary sibling folder first, so a
    failed save leaves nothing half-written at out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder for the merged model")
    needed = sum(p.numel() * p.element_size() for p in merged.model.parameters())
    with atomic_path(out_dir, folder=True, needed=needed) as tmp:  # transformers writes through mkstemp: user_mode
        merged.model.save_pretrained(tmp)  # safetensors, sharded when large
        merged.tokenizer.save_pretrained(tmp)
    return out_dir


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base: str | None = None,
                  dtype: str = "auto", merge_from: str | None = None) -> Path:
    """Merge the adapter (merge.merge) and save it to `out_dir` (save_merged)."""

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):  # before the slow part
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder for the merged model")
    return save_merged(merge(adapter_dir, merge_from=merge_from, dtype=dtype, base=base), out_dir)


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
