"""`python -m kto_lite export`: the command line of export.py (zip, merge, GGUF, GGUF LoRA, Hub).

Each step prints what it does, what it costs and, at the end, the exact commands that use the result.
Usage and input errors exit 2, failures while running exit 1 (cli.run).
"""

from __future__ import annotations

import re
from pathlib import Path

from kto_lite.commands import cli
from kto_lite.errors import UnsupportedModel, UsageError
from kto_lite.export import merge as m
from kto_lite.export.adapter import estimate_merge_memory, load_snippet, save_merged, zip_adapter
from kto_lite.export.gguf import QUANTS, architecture, base_config, read_metadata, write_gguf, write_lora_gguf
from kto_lite.export.gguf_vocab import adds_special
from kto_lite.export.merge import DTYPES, MERGE_FROM, drift_rows
from kto_lite.export.modelfile import modelfile, write_modelfile
from kto_lite.files import format_bytes
from kto_lite.gguf_input import gguf_source
from kto_lite.hub import check_hub_access, push_run, write_model_card
from kto_lite.model import load_tokenizer
from kto_lite.runs import adapter_base, check_adapter_dir, run_base

DESCRIPTION = """Ship a trained adapter: a zip, a merged model, a GGUF file for llama.cpp / Ollama, the Hub.

examples:
  python -m kto_lite export --adapter runs/demo --zip demo.zip
  python -m kto_lite export --adapter runs/demo --merge merged/        # merge_from quantized (4-bit runs)
  python -m kto_lite export --adapter runs/demo --gguf --quant q8_0    # + runs/demo/gguf/*.Modelfile
  python -m kto_lite export --adapter runs/demo --gguf_lora            # the adapter alone, for --lora / ADAPTER
  python -m kto_lite export --adapter runs/demo --push_to_hub me/demo-kto
"""


def parse_args(argv: list[str]):

    p = cli.Parser("export", DESCRIPTION)
    p.add_flag("adapter", required=True, metavar="DIR", help="a training run's output_dir (or any PEFT adapter folder)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--zip", metavar="OUT.zip", help="write the adapter, tokenizer and run record to a zip")
    what.add_argument("--merge", metavar="OUT_DIR", help="write the merged model (safetensors) to a new folder")
    what.add_argument("--gguf", action="store_true", help="write the merged model as one GGUF file (+ Modelfile)")
    what.add_argument("--gguf_lora", "--gguf-lora", dest="gguf_lora", action="store_true",
                      help="write the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER)")
    p.add_flag("merge_from", choices=MERGE_FROM, default=None,
               help="quantized: into the de-quantized 4-bit weights the adapter was trained on (the default for "
                    "4-bit runs: reproduces the trained model); full: into the original full-precision weights")
    p.add_flag("dtype", default="auto", choices=["auto", *DTYPES],
               help="precision of a merged folder; auto: the base's own (bf16 for most models). GGUF: fp16")
    p.add_flag("quant", default="f16", choices=QUANTS, help="GGUF tensor type: f16 (exact) or q8_0 (half the size)")
    p.add_flag("out", metavar="FILE", help="the GGUF file to write (default: ADAPTER/gguf/<run>-<merge>-<quant>.gguf)")
    p.add_flag("base", help="the base model (default: the one the adapter was trained on)")
    p.add_flag("base_gguf", metavar="FILE", help="--gguf_lora: the base model's GGUF that the adapter is applied to "
               "(default: the run's model when it is a .gguf file)")
    p.add_flag("drift_rows", type=int, default=8, metavar="N",
               help="rows of the run's data on which the merges are compared with the trained model (0: skip)")
    p.add_flag("push_to_hub", metavar="REPO_ID", help="upload the adapter folder with a model card (and what this "
               "command exported) to this Hugging Face Hub repo")
    p.add_flag("hub_private", type=cli.yaml_value, default=True, metavar="true|false",
               help="create the Hub repo as private (default: true)")
    return p.parse_args(argv)


def quiet_libraries() -> None:
    """Leave out what a user cannot act on: transformers' deprecation notes about calls inside peft and
    its per-file loading bars (bitsandbytes' kernel note: see export.py)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    quiet_libraries()
    return cli.run(lambda: export(args))


def export(args) -> int:
    if not (args.zip or args.merge or args.gguf or args.gguf_lora or args.push_to_hub):
        raise UsageError("choose what to export: --zip, --merge, --gguf, --gguf_lora or --push_to_hub")
    adapter = check_adapter_dir(args.adapter)
    if args.push_to_hub:

        check_hub_access(args.push_to_hub)  # before the slow part
    shipped: list[Path] = []
    if args.zip:
        shipped = [export_zip(adapter, args.zip, args.base)]
    elif args.merge:
        shipped = [export_merged(adapter, args)]
    elif args.gguf:
        shipped = export_gguf(adapter, args)
    elif args.gguf_lora:
        shipped = export_gguf_lora(adapter, args)
    if args.push_to_hub:

        write_model_card(adapter)
        extra = [p for p in shipped if not (args.zip and p.suffix == ".zip")]  # a zip duplicates the folder
        print(f"uploading {adapter} to the Hub as {args.push_to_hub} ({'private' if args.hub_private else 'public'})",
              flush=True)
        url = push_run(adapter, args.push_to_hub, private=bool(args.hub_private), extra=extra)
        print(f"uploaded: {url}")
    return 0


# --------------------------------------------------------------------------- the steps


def export_zip(adapter: Path, out: str, base: str | None) -> Path:

    path = zip_adapter(adapter, out)
    print(f"wrote {path} ({format_bytes(path.stat().st_size)})\n\nload it (after unzipping):\n")
    print(load_snippet(adapter.resolve().name, "adapter", base=base or adapter_base(adapter)))
    return path


def merged_with_drift(adapter: Path, args, dtype: str):
    """Merge as asked, printing the merge chosen, the memory it needs and its drift from the trained model."""

    base = args.base or adapter_base(adapter)
    merge_from = m.resolve_merge_from(adapter, args.merge_from)
    if args.merge_from == "quantized" and merge_from == "full":
        print("this run trained an unquantized base: the full merge is the trained model", flush=True)
    what = ("the de-quantized 4-bit weights it was trained on" if merge_from == "quantized"
            else "the full-precision weights")
    stored = str(m.merge_dtype(dtype, base)).removeprefix("torch.")
    print(f"merging {adapter} into {base}: into {what} (merge_from {merge_from}), stored as {stored}", flush=True)
    try:
        print(f"this needs about {format_bytes(estimate_merge_memory(base, dtype))} of RAM", flush=True)
    except (OSError, ValueError) as e:  # no config reachable: the merge itself will say more
        print(f"(could not estimate the memory needed: {e})", flush=True)

    rows = _drift_rows(adapter, base, args.drift_rows)
    trained = m.load_trained(adapter, base) if merge_from == "quantized" or rows else None
    reference = m.token_logps(trained, rows) if rows else None  # the trained model's own log-probs
    drift = {}
    if rows and m.trained_in_4bit(adapter):  # the other merge too, so the log shows what the choice is worth
        other = "full" if merge_from == "quantized" else "quantized"  # (loads its own copy of the base)
        other_model = m.merge(adapter, merge_from=other, dtype=dtype, base=base).model
        drift[other] = m.logprob_drift(reference, m.token_logps(other_model, rows))
        del other_model
    merged = m.merge(adapter, merge_from=merge_from, dtype=dtype, base=base,
                     trained=trained if merge_from == "quantized" else None)  # consumes `trained`
    if rows:
        drift[merge_from] = m.logprob_drift(reference, m.token_logps(merged.model, rows))
        measured = ", ".join(f"{name} {_nats(drift[name])}" for name in MERGE_FROM if name in drift)
        print(f"mean |Δ log p| per token vs the trained model ({len(rows)} rows of the run's data): {measured}"
              f"  (shipping: {merge_from})", flush=True)
    merged.drift = drift
    return merged


def _nats(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-4 else "<0.0001"


def _drift_rows(adapter: Path, base: str, n: int) -> list:

    if n <= 0:
        return []
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    rows = drift_rows(adapter, load_tokenizer(str(tokenizer_source)), n)
    if not rows:
        print("(drift from the trained model not measured: the run's data file is not readable from here)",
              flush=True)
    return rows


def export_merged(adapter: Path, args) -> Path:

    out = Path(args.merge)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before the slow part
        raise FileExistsError(f"{out} is not empty; choose a new folder for the merged model")
    merged = merged_with_drift(adapter, args, args.dtype)
    save_merged(merged, out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({format_bytes(size)}, merge_from {merged.merge_from})\n\nload it:\n")
    print(load_snippet(out, "merged"))
    return out


def _default_gguf(adapter: Path, kind: str) -> Path:
    return adapter / "gguf" / f"{adapter.resolve().name}-{kind}.gguf"


def ollama_name(adapter: Path) -> str:
    """A model name Ollama accepts (lowercase letters, digits, - _ .)."""
    return re.sub(r"[^a-z0-9._-]+", "-", adapter.resolve().name.lower()).strip("-.") or "kto-lite"


def _gguf_file(name: str | None) -> str | None:
    """The GGUF file a run was trained from (model: a .gguf file, or a folder holding one), else None."""

    found = gguf_source(str(name)) if name else None
    return str(found) if found is not None else None


def export_gguf(adapter: Path, args) -> list[Path]:

    run = run_base(adapter, base=args.base)  # the run's base (its revision), unless --base names another
    named, base = run.name, run.model
    architecture(base_config(base, revision=run.revision))  # refuse an unsupported model before merging
    dtype = "fp16" if args.dtype == "auto" else args.dtype
    merged = merged_with_drift(adapter, args, dtype)
    out = Path(args.out) if args.out else _default_gguf(adapter, f"{merged.merge_from}-{args.quant}")
    base_gguf = _gguf_file(named)
    print(f"writing {out} ({args.quant})", flush=True)
    write_gguf(merged.model, merged.tokenizer, out, quant=args.quant, name=adapter.resolve().name,
               base_gguf=base_gguf)
    text, has_template = modelfile(f"./{out.name}", merged.tokenizer, add_bos=adds_special(merged.tokenizer)[0],
                                   header=f"Made by kto_lite from {adapter} (merge: {merged.merge_from}, {args.quant}).")
    mf = write_modelfile(out.parent, text, name=out.with_suffix(".Modelfile").name)
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}) and {mf}"
          + ("" if has_template else " (no TEMPLATE: see the comment in it)"))
    name = ollama_name(adapter)
    print(f"\nrun it:\n  llama.cpp: llama-cli -m {out}\n  Ollama:    ollama create {name} -f {mf} && ollama run {name}")
    return [out, mf]


def export_gguf_lora(adapter: Path, args) -> list[Path]:

    run = run_base(adapter, base=args.base)  # the run's base (its revision), unless --base names another
    named, base = run.name, run.model
    config = base_config(base, revision=run.revision)
    arch = architecture(config)
    base_gguf = args.base_gguf or _gguf_file(named)
    if base_gguf:
        found = read_metadata(base_gguf).get("general.architecture")
        if found != arch.gguf_name:
            raise UnsupportedModel(f"{base_gguf} is a {found!r} model; the adapter was trained on a "
                                   f"{arch.gguf_name!r} model ({base})")
    out = Path(args.out) if args.out else _default_gguf(adapter, "lora")
    write_lora_gguf(adapter, out, config, name=adapter.resolve().name)
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}): the adapter alone, for llama.cpp --lora / Ollama ADAPTER")
    print("note: applied at run time to the base GGUF, the adapter meets that file's weights (f16, q8_0, ...), "
          "not the 4-bit NF4 weights it was trained on; --gguf writes the faithful merged model instead")
    if not base_gguf:
        print(f"\n{base} is not a GGUF file: give the base model's GGUF with --base_gguf (llama.cpp's "
              "convert_hf_to_gguf.py makes one) to get a Modelfile. With it:\n"
              f"  llama.cpp: llama-cli -m BASE.gguf --lora {out}")
        return [out]
    if not args.base_gguf:
        print(f"the run was trained from {base_gguf}: that file is the base (GGUF in, aligned GGUF out)")
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    text, has_template = modelfile(str(Path(base_gguf).resolve()), load_tokenizer(str(tokenizer_source)),
                                   adapter_file=f"./{out.name}", add_bos=_gguf_adds_bos(base_gguf),
                                   header=f"Made by kto_lite from {adapter}: base GGUF + LoRA adapter.")
    mf = write_modelfile(out.parent, text, name=out.with_suffix(".Modelfile").name)
    print(f"wrote {mf}" + ("" if has_template else " (no TEMPLATE: see the comment in it)"))
    name = ollama_name(adapter)
    print(f"\nrun it:\n  llama.cpp: llama-cli -m {base_gguf} --lora {out}\n"
          f"  Ollama:    ollama create {name} -f {mf} && ollama run {name}")
    return [out, mf]


def _gguf_adds_bos(path: str) -> bool:

    return bool(read_metadata(path).get("tokenizer.ggml.add_bos_token", False))
