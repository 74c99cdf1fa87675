"""The Export tab: the adapter as a zip, merged into the base, as GGUF files, or pushed to the Hub.

A zip is made in-process (cheap); merging, GGUF and the Hub run `python -m kto_lite export` in a
subprocess, so the full-precision copy of the base never lives in the app's memory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gradio as gr

from .. import runs
from ..runs import run_folder

MERGE_CHOICES = [("into the 4-bit weights it was trained on (faithful)", "quantized"),
                 ("into the full-precision weights", "full")]
GGUF_CHOICES = [("merged model, f16", "f16"), ("merged model, q8_0 (half the size)", "q8_0"),
                ("LoRA adapter alone (on your base GGUF)", "lora")]


def export_choices(current: str | None = None):
    choices = runs.adapter_runs()
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in values else (values[0] if values else None))


def zip_run(run: str | None):
    """(zip file for download, message). The zip goes to a temporary folder Gradio may serve."""
    from kto_lite.export.adapter import zip_adapter
    from kto_lite.files import format_bytes

    if not run:
        return None, "Choose a run with a saved adapter first."
    run = run_folder(run)
    out = Path(tempfile.gettempdir()) / "kto_lite_exports" / f"{Path(run).name}-adapter.zip"
    zip_adapter(run, out)
    return str(out), f"`{out.name}`: {format_bytes(out.stat().st_size)} (adapter, tokenizer, config, metrics)."


def merge_notice(run: str | None) -> str:
    """What a merge will need, said before Merge is pressed: the base reloaded on the CPU, and its RAM."""
    if not run:
        return "Train a run first: only runs with a saved adapter can be exported."
    import psutil

    from kto_lite.export.adapter import estimate_merge_memory
    from kto_lite.files import format_bytes
    from kto_lite.runs import adapter_base

    run = run_folder(run)
    base = adapter_base(run)
    try:
        need = estimate_merge_memory(base)
    except (OSError, ValueError) as e:
        return f"Before you press **Merge**: it reloads `{base}` on the CPU (its memory could not be estimated: {e})."
    free = psutil.virtual_memory().available
    verdict = "enough is free" if need < free else "⚠ **not enough free RAM**"
    return (f"Before you press **Merge**: it will reload `{base}` unquantized on the CPU, which needs about "
            f"**{format_bytes(need)}** of RAM; {format_bytes(free)} is free now ({verdict}). The faithful merge adds "
            "the adapter to the de-quantized 4-bit weights it was trained on; the merged model is saved in the run "
            "folder.")


def merged_dir(run: Path, merge_from: str | None) -> Path:
    """RUN/merged for the run's default merge (quantized for a 4-bit run), RUN/merged-full for the other."""
    from kto_lite.export.merge import resolve_merge_from

    chosen = resolve_merge_from(run, merge_from)
    return run / ("merged" if chosen == resolve_merge_from(run, None) else f"merged-{chosen}")


def _export(argv: list[str]):
    """Run `python -m kto_lite export ...`; yields the growing log, then (log, exit code) last."""
    argv = [sys.executable, "-m", "kto_lite", "export", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = f"$ python {' '.join(argv[1:])}\n"
    for line in proc.stdout:
        log += line
        yield log
    proc.wait()
    yield log, proc.returncode


def _show(text: str):
    return gr.update(value=text, visible=True)


def merge_run(run: str | None, merge_from: str | None = "quantized"):
    """Run `python -m kto_lite export --adapter RUN --merge RUN/merged[-full]`, streaming its output.

    Yields (merge log, load snippet); the log box is shown once there is something in it.
    """
    if not run:
        yield _show("Choose a run first."), gr.skip()
        return
    run = run_folder(run)
    out = merged_dir(run, merge_from)
    if out.exists():
        yield _show(f"{out} already exists (merged before)."), load_code(run, "merged")
        return
    for step in _export(["--adapter", str(run), "--merge", str(out), "--merge_from", merge_from or "quantized"]):
        if isinstance(step, str):
            yield _show(step), gr.skip()
    log, code = step
    if code != 0:
        yield _show(log + f"\nmerge failed (exit code {code})"), gr.skip()
        return
    yield _show(log), load_code(run, "merged")


def snippet_after_merge(run: str | None):
    """After a merge: the radio says "merged" (its change event shows the merged code)."""
    if not run or not any((run_folder(run) / name / "config.json").is_file() for name in ("merged", "merged-full")):
        return gr.skip()
    return "merged"


def _commands(log: str) -> str:
    """The "run it:" lines the command printed (llama.cpp, Ollama), or its advice when there are none."""
    lines = [line.strip() for line in log.splitlines() if line.strip().startswith(("llama.cpp:", "Ollama:"))]
    return "\n".join(line.split(":", 1)[1].strip() for line in lines)


def _servable(path: Path) -> str:
    """A path Gradio may serve: under the working directory or the temp folder, else linked into the temp folder."""
    resolved = path.resolve()
    roots = [Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()]
    if any(resolved.is_relative_to(r) for r in roots):
        return str(path)
    target = Path(tempfile.gettempdir()) / "kto_lite_exports" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(resolved, target)  # no copy of a big file when on the same disk
    except OSError:
        shutil.copyfile(resolved, target)
    return str(target)


def gguf_run(run: str | None, kind: str = "f16", merge_from: str | None = "quantized"):
    """Run `python -m kto_lite export --gguf` (or --gguf_lora). Yields (log, files to download, commands)."""
    if not run:
        yield _show("Choose a run first."), gr.skip(), gr.skip()
        return
    run = run_folder(run)
    flags = ["--gguf_lora"] if kind == "lora" else ["--gguf", "--quant", kind, "--merge_from", merge_from or "quantized"]
    for step in _export(["--adapter", str(run), *flags]):
        if isinstance(step, str):
            yield _show(step), gr.skip(), gr.skip()
    log, code = step
    if code != 0:
        yield _show(log + f"\nGGUF export failed (exit code {code})"), None, ""
        return
    written = [Path(m) for m in re.findall(r"^wrote (\S+\.(?:gguf|Modelfile))", log, re.MULTILINE)]
    written += [Path(m) for m in re.findall(r" and (\S+\.Modelfile)", log)]
    files = [_servable(p) for p in dict.fromkeys(written) if p.is_file()]
    yield _show(log), files, _commands(log)


def push_run(run: str | None, repo_id: str, private: bool = True):
    """Run `python -m kto_lite export --push_to_hub REPO`. Yields (log, message with the link)."""
    if not run:
        yield _show("Choose a run first."), gr.skip()
        return
    if not (repo_id or "").strip():
        yield _show("Give a repo id: OWNER/NAME."), gr.skip()
        return
    run = run_folder(run)
    argv = ["--adapter", str(run), "--push_to_hub", repo_id.strip(), "--hub_private", str(bool(private)).lower()]
    for step in _export(argv):
        if isinstance(step, str):
            yield _show(step), gr.skip()
    log, code = step
    url = re.search(r"^uploaded: (\S+)", log, re.MULTILINE)
    if code != 0 or not url:
        yield _show(log + f"\nupload failed (exit code {code})"), "**Upload failed**: see the log."
        return
    yield _show(log), f"✓ Uploaded: [{url.group(1)}]({url.group(1)})"


def load_code(run: str | None, kind: str = "adapter") -> str:
    from kto_lite.export.adapter import load_snippet

    if not run:
        return ""
    run = run_folder(run)
    if kind != "merged":
        return load_snippet(run, kind)
    for name in ("merged", "merged-full"):
        if (run / name / "config.json").is_file():
            return load_snippet(run / name, "merged")
    return "# merge the adapter first (Merge button above)"


# ---------------------------------------------------------------------- layout and wiring
def build() -> None:
    with gr.Tab("Export", id="export") as tab:
        run = gr.Dropdown(choices=[], label="run", info="Runs with a saved adapter.", allow_custom_value=True)
        merge_from = gr.Radio(MERGE_CHOICES, value="quantized", label="merge the adapter",
                              info="Merged folders and merged GGUF files start from this merge. The 4-bit one "
                                   "behaves like the trained model; see docs/export.md for the measured gap.")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Adapter (small)\nThe LoRA weights, tokenizer and run record, as a zip.")
                zip_button = gr.Button("Make the zip")
                zip_file = gr.File(label="download", interactive=False, height=80)
                zip_message = gr.Markdown()
            with gr.Column():
                gr.Markdown("### Merged model\nThe adapter merged into the base, saved as safetensors "
                            "(loads without peft).")
                merge_info = gr.Markdown("Train a run first: only runs with a saved adapter can be exported.")
                merge_button = gr.Button("Merge")
                merge_log = gr.Code(language=None, label="merge output", lines=3, max_lines=12, wrap_lines=True,
                                    show_line_numbers=False, visible=False)
        with gr.Row():
            with gr.Column():
                gr.Markdown("### GGUF (llama.cpp, Ollama, LM Studio)\nOne file with the tokenizer and chat "
                            "template, and an Ollama Modelfile next to it.")
                gguf_kind = gr.Radio(GGUF_CHOICES, value="f16", label="GGUF")
                gguf_button = gr.Button("Make the GGUF")
                gguf_files = gr.File(label="download", interactive=False, file_count="multiple", height=100)
                gguf_commands = gr.Code(language="shell", label="run it", lines=2, wrap_lines=True,
                                        show_line_numbers=False)
                gguf_log = gr.Code(language=None, label="export output", lines=3, max_lines=12, wrap_lines=True,
                                   show_line_numbers=False, visible=False)
            with gr.Column():
                gr.Markdown("### Hugging Face Hub\nThe adapter with a model card (settings, metrics, data "
                            "summary, how to load it). Needs a token: HF_TOKEN or `hf auth login`.")
                hub_repo = gr.Textbox(label="repo id", placeholder="your-name/my-kto-model")
                hub_private = gr.Checkbox(label="private repo", value=True)
                hub_button = gr.Button("Push to the Hub")
                hub_message = gr.Markdown()
                hub_log = gr.Code(language=None, label="upload output", lines=3, max_lines=12, wrap_lines=True,
                                  show_line_numbers=False, visible=False)
        snippet_kind = gr.Radio(["adapter", "merged"], value="adapter", label="load it with transformers / peft")
        snippet = gr.Code(language="python", label="Python", lines=10, show_line_numbers=False)

    tab.select(export_choices, run, run, api_visibility="private")
    run.change(merge_notice, run, merge_info, api_visibility="private").then(
        load_code, [run, snippet_kind], snippet, api_visibility="private")
    snippet_kind.change(load_code, [run, snippet_kind], snippet, api_visibility="private")
    zip_button.click(zip_run, run, [zip_file, zip_message], api_name="zip")
    merge_button.click(merge_run, [run, merge_from], [merge_log, snippet], api_name="merge",
                       concurrency_limit=1, concurrency_id="export").then(
        snippet_after_merge, run, snippet_kind, api_visibility="private")  # the radio follows
    gguf_button.click(gguf_run, [run, gguf_kind, merge_from], [gguf_log, gguf_files, gguf_commands],
                      api_name="gguf", concurrency_limit=1, concurrency_id="export")
    hub_button.click(push_run, [run, hub_repo, hub_private], [hub_log, hub_message], api_name="push")
