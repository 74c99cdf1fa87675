"""Handlers of the Chat and Export tabs.

One `kto_lite.feedback.chat.ChatModel` is kept loaded at a time (switching tabs or sending another message
does not reload it). Base and tuned answers come from that one copy, with the adapters switched off
for the base. Thumbs up / down append rows to a feedback file that the Data tab offers as training
data. Export zips an adapter in-process (cheap) and merges with `python -m kto_lite export` in a
subprocess, so the full-precision copy of the base never lives in the app's memory.
"""

from __future__ import annotations

import gc
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr

from kto_lite.runs import FEEDBACK_FILE

from . import jobs
from .handlers import SETTINGS, run_folder

BASE = "__base__"  # the chat source "base model, no adapter"
_STOP = threading.Event()  # set by the Stop button: generation ends at its next token
_CACHE: dict = {"key": None, "model": None}
_CACHE_LOCK = threading.Lock()


# ---------------------------------------------------------------------- choosing and loading a model
def chat_choices() -> list[tuple[str, str]]:
    """Runs with a saved adapter (finished, or stopped: a stop saves it too), then the base model."""
    runs = [(f"{run.name} · {jobs.run_state(run).state}", str(run))
            for run in jobs.list_runs(SETTINGS.runs_dir) if jobs.has_adapter(run)]
    return runs + [("Base model only (no adapter)", BASE)]


def refresh_chat_choices(current: str | None):
    """On opening the tab: list the runs again; nothing chosen yet picks the newest run."""
    choices = chat_choices()
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in values else values[0])


def get_chat_model(source: str, base_model: str | None = None):
    """The loaded ChatModel for `source` (a run folder or BASE), loading it if it is not the cached one."""
    from kto_lite.feedback.chat import ChatModel

    key = (source, (base_model or "").strip() if source == BASE else "")
    with _CACHE_LOCK:
        if _CACHE["key"] != key:
            _CACHE.update(key=None, model=None)  # free the old weights before loading new ones
            gc.collect()
            if source == BASE:
                model = ChatModel(model=key[1] or None)
            else:
                model = ChatModel(adapter=run_folder(source))
            _CACHE.update(key=key, model=model)
        return _CACHE["model"]


def source_changed(source: str | None, side_by_side: bool):
    """New source: clear both conversations, label the columns, show the feedback counts."""
    label = "Tuned (adapter on)" if source not in (None, BASE) else "Base model"
    base = gr.update(value=[], visible=_side_by_side(source, side_by_side))
    return gr.update(value=[], label=label), base, feedback_summary(source), new_turns()


def _side_by_side(source: str | None, side_by_side: bool) -> bool:
    return bool(side_by_side) and source not in (None, BASE)


def clear_chat():
    return [], [], "", new_turns()


def new_turns() -> dict:
    """What conditioned each reply, by column and message index: {"system": str | None, "seed": int}.

    Kept beside the chat (a gr.State) because the Chatbot holds only the visible messages: a thumbs
    up needs the system prompt the reply was generated with, which may have changed since.
    """
    return {"tuned": {}, "base": {}}


# ---------------------------------------------------------------------- chatting
def _messages(history) -> list[dict]:
    from kto_lite.feedback.chat import normalize_messages

    return normalize_messages(history or [])


def chat_send(message: str, tuned_history, base_history, source: str, base_model: str, side_by_side: bool,
              system_prompt: str, temperature: float, top_p: float, max_new_tokens: int, turns: dict | None = None):
    """Stream a reply (or two: base then tuned, in side-by-side mode).

    Yields (box, tuned, base, status, turns); `turns` records each reply's system prompt and seed.
    """
    tuned_history, base_history = _messages(tuned_history), _messages(base_history)
    turns = _copy_turns(turns)
    if not (message or "").strip():
        yield gr.skip(), gr.skip(), gr.skip(), "Type a message first.", gr.skip()
        return
    if not source:
        yield gr.skip(), gr.skip(), gr.skip(), "Choose a model first.", gr.skip()
        return
    _STOP.clear()
    user = {"role": "user", "content": message}
    tuned_history.append(user)
    both = _side_by_side(source, side_by_side)
    if both:
        base_history.append(user)
    yield "", tuned_history, base_history, "Loading the model (once; it stays loaded)...", gr.skip()
    try:
        model = get_chat_model(source, base_model)
    except (OSError, ValueError, RuntimeError) as e:
        tuned_history.pop()
        if both:
            base_history.pop()
        yield message, tuned_history, base_history, f"**Error:** could not load the model: {e}", gr.skip()
        return
    # one seed for both sides: differences come from the adapter, not from sampling
    turn = {"system": (system_prompt or "").strip() or None, "seed": random.randrange(2**31)}
    options = _options(turn, temperature, top_p, max_new_tokens)
    sides = [("base", base_history, False), ("tuned", tuned_history, True)] if both else \
        [("tuned", tuned_history, model.has_adapter)]
    for column, history, use_adapter in sides:
        prompt = list(history)
        turns[column][len(history)] = turn
        history.append({"role": "assistant", "content": ""})
        for text in model.stream(prompt, use_adapter=use_adapter, **options):
            history[-1]["content"] = text
            yield gr.skip(), tuned_history, base_history, "Generating...", turns
        if _STOP.is_set():
            break
    yield gr.skip(), tuned_history, base_history, _done(model), turns


def base_column(source: str | None, side_by_side: bool, tuned_history, base_history, turns: dict | None,
                base_model: str, temperature: float, top_p: float, max_new_tokens: int):
    """Side by side switched on or off. Yields (base column, status, turns).

    Turned on after some messages, the base column answers them too, one by one, each with the seed
    and system prompt of the tuned reply to the same message: the column then holds what it would
    hold had side by side been on from the start (the base's own replies, not the tuned ones).
    """
    if not _side_by_side(source, side_by_side):
        yield gr.update(visible=False), gr.skip(), gr.skip()
        return
    tuned, base = _messages(tuned_history), _messages(base_history)
    turns = _copy_turns(turns)
    base = _answered_prefix(base, tuned)
    missing = [i for i, m in enumerate(tuned) if m["role"] == "user"][sum(m["role"] == "user" for m in base):]
    if not missing:
        yield gr.update(visible=True, value=base), gr.skip(), turns
        return
    _STOP.clear()
    status = f"Answering the {len(missing)} earlier message(s) with the base model (adapters off)..."
    yield gr.update(visible=True, value=base), status, gr.skip()
    try:
        model = get_chat_model(source, base_model)
    except (OSError, ValueError, RuntimeError) as e:
        yield gr.skip(), f"**Error:** could not load the model: {e}", gr.skip()
        return
    for user_index in missing:
        reply = tuned[user_index + 1] if user_index + 1 < len(tuned) else None
        turn = (turns["tuned"].get(user_index + 1) if reply and reply["role"] == "assistant" else None) or \
            {"system": None, "seed": random.randrange(2**31)}  # a turn the tuned side never answered
        base.append(tuned[user_index])
        prompt = list(base)
        turns["base"][len(base)] = turn
        base.append({"role": "assistant", "content": ""})
        for text in model.stream(prompt, use_adapter=False, **_options(turn, temperature, top_p, max_new_tokens)):
            base[-1]["content"] = text
            yield base, status, turns
        if _STOP.is_set():
            break
    yield base, _done(model), turns


def _answered_prefix(base: list[dict], tuned: list[dict]) -> list[dict]:
    """The base conversation, kept only while its user messages are the tuned side's first ones
    (Clear, or messages sent with side by side off, make it stale), and without an unanswered end."""
    users = [m["content"] for m in tuned if m["role"] == "user"]
    base_users = [m["content"] for m in base if m["role"] == "user"]
    if base_users != users[:len(base_users)]:
        return []
    while base and base[-1]["role"] != "assistant":
        base = base[:-1]
    return base


def _options(turn: dict, temperature: float, top_p: float, max_new_tokens: int) -> dict:
    return dict(system_prompt=turn["system"], seed=turn["seed"], temperature=float(temperature),
                top_p=float(top_p), max_new_tokens=int(max_new_tokens), stop_event=_STOP)


def _done(model) -> str:
    stats = model.last_stats
    if _STOP.is_set():
        return "■ Stopped."
    return f"{stats.get('new_tokens', 0)} tokens in {stats.get('seconds', 0):.1f} s" if stats else ""


def _copy_turns(turns: dict | None) -> dict:
    turns = turns or new_turns()
    return {"tuned": dict(turns.get("tuned", {})), "base": dict(turns.get("base", {}))}


def stop_chat() -> str:
    _STOP.set()
    return "■ Stopping..."


# ---------------------------------------------------------------------- feedback
def feedback_path(source: str | None, base_model: str | None = None) -> Path:
    """<run>/feedback.jsonl for a run; runs/_feedback/<model>.jsonl for the base model."""
    if source and source != BASE:
        return run_folder(source) / FEEDBACK_FILE
    name = jobs.slugify(Path((base_model or "").rstrip("/")).name, default="demo")
    return SETTINGS.runs_dir / "_feedback" / f"{name}.jsonl"


def feedback_summary(source: str | None, base_model: str | None = None) -> str:
    from kto_lite.feedback.chat import feedback_counts

    if not source:
        return ""
    path = feedback_path(source, base_model)
    c = feedback_counts(path)
    if not c["rows"]:
        return "Rate replies with the thumbs under them: each rating becomes a training example for the next round."
    return (f"**Feedback so far:** {c['desirable']} liked / {c['undesirable']} disliked, saved in `{path}`. "
            "Train on it: **Data** tab → *feedback from the Chat tab*.")


def record_feedback(source: str, base_model: str, prompt: list[dict] | str, completion: str, liked: bool) -> str:
    """Append one rated reply to the feedback file of `source`; returns the counts line."""
    from kto_lite.feedback.chat import append_feedback

    append_feedback(feedback_path(source, base_model), prompt, completion, bool(liked))
    return feedback_summary(source, base_model)


def api_record_feedback(source: str, base_model: str, prompt: str, completion: str, liked: bool) -> str:
    """API endpoint (scripts, tests): rate one reply to a single-message prompt."""
    return record_feedback(source, base_model, prompt, completion, liked)


def on_like(history, source: str, base_model: str, turns: dict | None, column: str, evt: gr.LikeData) -> str:
    """A thumbs up / down on a reply: the conversation before it is the prompt, the reply the completion.

    A reply generated with a system prompt keeps it: the prompt is then stored as messages starting
    with that system message, so training conditions on what the reply was conditioned on.
    """
    messages = _messages(history)
    index = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
    if not isinstance(evt.liked, bool) or not 0 <= index < len(messages):  # un-rating: nothing to record
        return gr.skip()
    if messages[index]["role"] != "assistant":
        return gr.skip()
    prompt = [m for m in messages[:index] if m["role"] != "system"]
    system = ((turns or {}).get(column) or {}).get(index, {}).get("system")
    if system:
        prompt = [{"role": "system", "content": system}] + prompt
    return record_feedback(source, base_model, prompt, messages[index]["content"], evt.liked)


# ---------------------------------------------------------------------- Export tab
MERGE_CHOICES = [("into the 4-bit weights it was trained on (faithful)", "quantized"),
                 ("into the full-precision weights", "full")]
GGUF_CHOICES = [("merged model, f16", "f16"), ("merged model, q8_0 (half the size)", "q8_0"),
                ("LoRA adapter alone (on your base GGUF)", "lora")]


def export_choices(current: str | None = None):
    choices = [(f"{run.name} · {jobs.run_state(run).state}", str(run))
               for run in jobs.list_runs(SETTINGS.runs_dir) if jobs.has_adapter(run)]
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
    """What a merge needs: the base reloaded on the CPU, and its RAM."""
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
        return f"⚠ Merging reloads `{base}` on the CPU (could not estimate the memory: {e})."
    free = psutil.virtual_memory().available
    verdict = "✓" if need < free else "⚠ **not enough free RAM**:"
    return (f"{verdict} Merging reloads `{base}` unquantized on the CPU and needs about **{format_bytes(need)}** "
            f"of RAM; {format_bytes(free)} is free now. The faithful merge adds the adapter to the de-quantized "
            "4-bit weights it was trained on; the merged model is saved in the run folder.")


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
