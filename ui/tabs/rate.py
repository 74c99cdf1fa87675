"""The Rate tab: several answers per prompt from a run, rated, then the next round.

1. Prompts are typed (one per line) or read from a data file in any of the project's formats: a
   `prompt` column (text or chat messages), or `messages` (the final assistant turn, the old
   completion, is dropped). The file's other columns (a reference answer) are kept for a judge.
2. `ChatModel.sample` answers each prompt n times in one batch, with the Chat tab's loaded model
   (chat.get_chat_model: one copy of the weights, adapters on), seeded as
   `python -m kto_lite sample` seeds (kto_lite.generation).
3. Each answer is rated with the thumbs under it, or by a judge (`kto_lite.judges`) for those not
   rated by hand. Saving appends the rated answers to the run's feedback file, in the same rows the
   Chat tab's thumbs write (`kto_lite.feedback.chat.append_feedback`); the Data tab lists that file.
4. "Train the next round" starts `python -m kto_lite train` with the run's own settings at half its
   learning rate, the feedback file as data and `--init_adapter RUN`: training continues from the run's adapter.

The answers in progress live in a gr.State `batch`: {"source", "base_model", "system", "items"}, one
item per answer: {"prompt", "row", "completion", "label" (None: unrated), "by", "saved", "index"}
where "index" is the answer's position in the Chatbot (what a thumbs event reports).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import gradio as gr

from kto_lite import presets
from kto_lite.config import TrainConfig
from kto_lite.errors import ConfigError, DataError

from .. import form, jobs, runs
from ..runs import BASE
from . import chat
from .data import DATA_TYPES

BY_HAND = ""  # the judge choice "rate with the thumbs": no judge
REFERENCE_JUDGES = (("number", "has the same last number as"), ("exact", "equals"), ("contains", "contains"))
# The demo task's judge, when the recipes folder is there (a source checkout): for the demo model's answers.
DEMO_JUDGE = Path(__file__).resolve().parents[2] / "recipes" / "demo_task.py"
MAX_ANSWERS = 16
NO_FILE = ""  # the shipped-file dropdown's "use the typed prompts" choice


# ---------------------------------------------------------------------- prompts
def read_prompts(path: str | Path) -> tuple[list[dict], list[str]]:
    """({"prompt", "row", "row_index"} per distinct prompt, in file order; the file's columns).

    `kto_lite.generation.read_prompts` reads the file (DataError on a bad row); a prompt asked in several
    rows (a feedback file rates each prompt more than once) is asked once. `row_index` is the prompt's row
    position: it seeds the answers as `python -m kto_lite sample` seeds that row's samples.
    """
    from kto_lite.generation import read_prompts as read_prompt_file

    found = read_prompt_file(path)
    prompts, seen = [], set()
    for index, row in enumerate(found.rows):
        key = repr(row.prompt)
        if key not in seen:
            seen.add(key)
            prompts.append({"prompt": row.prompt, "row": row.row, "row_index": index})
    return prompts, found.columns


def typed_prompts(text: str) -> list[dict]:
    """One prompt per non-empty line, no row to judge against."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return [{"prompt": line, "row": {}, "row_index": i} for i, line in enumerate(lines)]


def load_prompt_file(path: str | Path | None, shown: str | None = None):
    """A prompt file chosen (upload or shipped): (file state, the line under it)."""
    if not path:
        return None, ""
    shown = shown or Path(path).name
    try:
        prompts, columns = read_prompts(path)
    except DataError as e:
        return None, "⚠ **Cannot read prompts from this file**\n\n" + runs.error_markdown(e, path, shown)
    others = [c for c in columns if c not in ("prompt", "messages", "completion", "label", "chosen", "rejected")]
    extra = f"; other columns, for a judge: {', '.join(f'`{c}`' for c in others)}" if others else ""
    state = {"path": str(path), "name": shown, "prompts": prompts, "columns": columns}
    return state, (f"**{len(prompts)} distinct prompts** in {runs.markdown_text(shown)}{extra}. "
                   "They replace the typed prompts (clear the upload, or choose *none*, to use those).")


def on_prompt_upload(file_path: str | None):
    return load_prompt_file(file_path, Path(file_path).name if file_path else None)


def on_prompt_sample(choice: str | None):
    """A shipped file chosen, or NO_FILE: back to the typed prompts."""
    return load_prompt_file(_shipped_files().get(choice or ""), choice)


def _shipped_files() -> dict[str, Path]:
    return {**runs.heldout_files(), **runs.sample_files()}


def prompt_sample_choices() -> list[tuple[str, str]]:
    return [("none: the typed prompts", NO_FILE)] + [(name, name) for name in _shipped_files()]


# ---------------------------------------------------------------------- which judges can work here
def judge_choices(prompt_file: dict | None, source: str | None, base_model: str = "") -> list[tuple[str, str]]:
    """The judges that can rate these rows: by hand always; a reference judge when the prompt file has a
    reference column (typed prompts have none); the demo task's judge for the demo model's answers, where
    code may run (runs.SETTINGS.code_allowed)."""
    from kto_lite.judges import REFERENCE_COLUMNS

    choices = [("by hand: the thumbs under each answer", BY_HAND)]
    columns = prompt_file["columns"] if prompt_file else []
    reference = next((c for c in REFERENCE_COLUMNS if c in columns), None)
    if reference:
        choices += [(f"{spec}: the answer {how} the '{reference}' column", spec) for spec, how in REFERENCE_JUDGES]
    if DEMO_JUDGE.is_file() and runs.SETTINGS.code_allowed and _answers_from_demo(source, base_model):
        choices.append(("demo arithmetic (recipes/demo_task.py)", f"python:{DEMO_JUDGE}:judge"))
    return choices


def _answers_from_demo(source: str | None, base_model: str) -> bool:
    from kto_lite.demo import DEMO_MODEL_DIR
    from kto_lite.runs import adapter_base

    if not source:
        return False
    base = (base_model or "").strip() if source == BASE else adapter_base(runs.run_folder(source), resolve=False)
    return not base or Path(base).resolve() == DEMO_MODEL_DIR.resolve()


def refresh_judges(prompt_file: dict | None, source: str | None, base_model: str, current: str | None):
    """The judge dropdown for the rows at hand (keeps the choice when it still applies)."""
    choices = judge_choices(prompt_file, source, base_model)
    values = [v for _, v in choices]
    return gr.update(choices=choices, value=current if current in values else BY_HAND)


# ---------------------------------------------------------------------- answers
def generate(source: str | None, base_model: str, typed: str, prompt_file: dict | None, max_prompts: float,
             n: float, temperature: float, seed: float, max_new_tokens: float, system: str,
             progress=gr.Progress()):
    """Answer every prompt n times. Yields (answers chatbot, status, batch) after each prompt."""
    prompts = prompt_file["prompts"][: max(1, int(max_prompts or 1))] if prompt_file else typed_prompts(typed)
    n, seed = int(n or 1), int(seed or 0)
    problem = _generation_problem(source, prompts, n, temperature)
    if problem:
        yield gr.skip(), problem, gr.skip()
        return
    system = (system or "").strip() or None
    batch = {"source": source, "base_model": base_model or "", "system": system, "items": []}
    yield [], "Loading the model (once; the Chat tab shares it)...", batch
    try:
        model = chat.get_chat_model(source, base_model)
    except (OSError, ValueError, RuntimeError) as e:
        yield gr.skip(), f"**Error:** could not load the model: {e}", gr.skip()
        return
    messages = []
    for i, p in enumerate(progress.tqdm(prompts, desc="prompts")):
        prompt = p["prompt"] if isinstance(p["prompt"], list) else [{"role": "user", "content": p["prompt"]}]
        # seeded by (seed, the prompt's row, j): a prompt's answers do not depend on the others asked
        answers = model.sample(prompt, n, system_prompt=system, temperature=float(temperature),
                               max_new_tokens=int(max_new_tokens), seed=seed, index=p["row_index"])
        messages.append({"role": "user", "content": _shown_prompt(p["prompt"])})
        for answer in answers:
            batch["items"].append({"prompt": p["prompt"], "row": p["row"], "completion": answer, "label": None,
                                   "by": None, "saved": False, "index": len(messages)})
            messages.append({"role": "assistant", "content": answer})
        done = f"{i + 1} / {len(prompts)} prompts, {len(batch['items'])} answers"
        yield messages, (f"Generating: {done}..." if i + 1 < len(prompts) else
                         f"✓ {done}. Rate each answer with the thumbs under it, or let a judge rate them."), batch


def _generation_problem(source, prompts: list, n: int, temperature: float) -> str:
    if not source:
        return "Choose a run (or the base model) first."
    if not prompts:
        return "Type some prompts (one per line) or choose a prompt file first."
    if not 1 <= n <= MAX_ANSWERS:
        return f"Answers per prompt: 1 to {MAX_ANSWERS}."
    if float(temperature) <= 0 and n > 1:
        return "Temperature 0 is greedy decoding: the n answers would all be the same. Raise it, or use n = 1."
    return ""


def _shown_prompt(prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"**{m['role']}:** {m['content']}" for m in prompt)


def _feedback_values(batch: dict) -> list[str | None]:
    """The thumbs shown under each answer, in Chatbot order."""
    return [None if it["label"] is None else "Like" if it["label"] else "Dislike" for it in batch["items"]]


# ---------------------------------------------------------------------- rating
def on_rate(batch: dict | None, evt: gr.LikeData):
    """A thumbs click on an answer: (batch, counts). Clicking the chosen thumb again un-rates it."""
    index = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
    item = next((it for it in (batch or {}).get("items", []) if it["index"] == index), None)
    if item is None:
        return gr.skip(), gr.skip()
    if item["saved"]:
        return gr.skip(), counts(batch) + "\n\n⚠ That answer is already in the feedback file; its rating stays."
    label = evt.liked if isinstance(evt.liked, bool) else None  # "" (or None): the thumb was un-clicked
    item.update(label=label, by="you" if label is not None else None)
    return batch, counts(batch)


def judge_answers(batch: dict | None, spec: str, reference_column: str, threshold: str | float | None):
    """Rate the answers nobody rated by hand with a judge. Returns (answers chatbot, counts, batch).

    `threshold` (text; empty: none) turns a python judge's score into a label (score >= threshold).
    """
    from kto_lite.judges import JudgeSpecError, apply_judge, make_judge

    refused = runs.code_refusal({"judge": spec})
    if refused:
        return gr.skip(), f"**Judge:** {runs.markdown_text(refused)}", gr.skip()
    if not batch or not batch["items"]:
        return gr.skip(), "Generate some answers first.", gr.skip()
    if not (spec or "").strip():
        return gr.skip(), counts(batch) + "\n\nChoose a judge first (by hand, the thumbs under each answer rate it).", \
            gr.skip()
    try:
        threshold = None if str(threshold or "").strip() == "" else float(threshold)
    except ValueError:
        return gr.skip(), f"**Judge:** the threshold must be a number, not {runs.markdown_text(str(threshold))}", \
            gr.skip()
    try:
        judge = make_judge(spec, reference_column=(reference_column or "").strip() or None, threshold=threshold)
    except JudgeSpecError as e:
        return gr.skip(), f"**Judge:** {runs.markdown_text(str(e))}", gr.skip()
    failures = []
    for item in batch["items"]:
        if item["saved"] or item["by"] == "you":
            continue
        label, why = apply_judge(judge, item["prompt"], item["completion"], item["row"])
        item.update(label=label, by="judge" if label is not None else None)
        if why:
            failures.append(f"{_shown_prompt(item['prompt'])[:80]}: {why}")
    note = ""
    if failures:
        listed = "\n".join(f"- {runs.markdown_text(f)}" for f in failures[:5])
        more = f"\n- ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        note = f"\n\n⚠ The judge could not rate {len(failures)} answer(s); they stay unrated:\n{listed}{more}"
    update = gr.update(feedback_value=_feedback_values(batch))
    return update, counts(batch) + note, batch


def counts(batch: dict | None) -> str:
    """This batch's ratings, then the feedback file they go to."""
    if not batch or not batch["items"]:
        return ""
    items = batch["items"]
    up = sum(it["label"] is True for it in items)
    down = sum(it["label"] is False for it in items)
    by_judge = sum(it["by"] == "judge" for it in items)
    saved = sum(it["saved"] for it in items)
    line = (f"**{len(items)} answers:** {up} liked · {down} disliked · {len(items) - up - down} unrated"
            + (f" ({by_judge} rated by the judge)" if by_judge else "") + (f" · {saved} saved" if saved else ""))
    return line + "\n\n" + feedback_line(batch["source"], batch["base_model"])


def feedback_line(source: str | None, base_model: str = "") -> str:
    """Where the ratings go and what is there already."""
    from kto_lite.feedback.chat import feedback_counts

    if not source:
        return ""
    path = runs.feedback_path(source, base_model)
    c = feedback_counts(path)
    where = path.relative_to(runs.SETTINGS.runs_dir) if path.is_relative_to(runs.SETTINGS.runs_dir) else path
    return (f"**Feedback file** `{where}` (in the runs folder): {c['desirable']} liked / {c['undesirable']} "
            "disliked.")


def save_ratings(batch: dict | None):
    """Append the rated, unsaved answers to the feedback file. Returns (counts, batch)."""
    from kto_lite.feedback.chat import append_feedback

    todo = [it for it in (batch or {}).get("items", []) if it["label"] is not None and not it["saved"]]
    if not todo:
        return (counts(batch) + "\n\nNothing new to save: rate some answers first." if batch else
                "Generate and rate some answers first."), gr.skip()
    path = runs.feedback_path(batch["source"], batch["base_model"])
    for item in todo:
        append_feedback(path, feedback_prompt(item["prompt"], batch["system"]), item["completion"], item["label"])
        item["saved"] = True
    return f"✓ Added {len(todo)} rated answers to the feedback file.\n\n" + counts(batch), batch


def feedback_prompt(prompt: str | list[dict], system: str | None) -> str | list[dict]:
    """The prompt as the answer saw it: with the system prompt it was generated with (as
    ChatModel.prompt_ids puts it: first, replacing any other), so training sees the same tokens."""
    if not system:
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]


# ---------------------------------------------------------------------- the next round
def train_next_round(source: str | None, base_model: str, batch: dict | None, epochs: float | None,
                     reference: str):
    """Start `python -m kto_lite train` from the run's adapter on its feedback. Returns (message, command)."""
    if not source:
        return "Choose a run first.", gr.skip()
    unsaved = [it for it in (batch or {}).get("items", []) if it["label"] is not None and not it["saved"]]
    if unsaved and batch["source"] == source:
        return f"⚠ {len(unsaved)} rated answers are not saved yet: **Add them to the feedback file** first.", gr.skip()
    feedback = runs.feedback_path(source, base_model)
    from kto_lite.feedback.chat import feedback_counts

    rows = feedback_counts(feedback)
    if not rows["rows"]:
        return "No feedback yet for this run: rate some answers and add them to the feedback file.", gr.skip()
    if source == BASE and runs.path_refusal("base model", base_model, model=True):
        return f"**Refused:** {runs.markdown_text(runs.path_refusal('base model', base_model, model=True))}", \
            gr.skip()
    busy = jobs.find_active(runs.SETTINGS.runs_dir)
    if busy is not None:
        return jobs.busy_message(busy), gr.skip()
    try:
        config, previous = next_round_config(source, base_model, feedback, epochs, reference)
        refused = runs.code_refusal(config.to_dict())
        if refused:
            return f"**Refused:** {runs.markdown_text(refused)}", gr.skip()
        jobs.JOBS.start(form.train_argv(config), Path(config.output_dir))
    except ConfigError as e:
        return f"**Error:** {runs.markdown_text(str(e))}", gr.skip()
    except RuntimeError as e:
        return f"**Busy:** {e}", gr.skip()
    start = f"the adapter of `{previous.name}`" if previous else "fresh LoRA weights on the base model"
    return (f"▶ Started `{Path(config.output_dir).name}` from {start}, on {rows['rows']} rated answers "
            f"({rows['desirable']} liked / {rows['undesirable']} disliked). Follow it in the **Train** tab.",
            form.command_line(form.train_argv(config)))


def next_round_config(source: str, base_model: str, feedback: Path, epochs: float | None,
                      reference: str) -> tuple[TrainConfig, Path | None]:
    """The next round's TrainConfig and the run it starts from (None for the base model).

    The run's own settings (its config.yaml: model, LoRA shape, beta, ...), except: data is a snapshot
    of its feedback file (the run keeps pointing at rows that do not change), init_adapter is the run,
    the reference is `reference`, the learning rate is half the run's (as the loop's later rounds:
    kto_lite.feedback.loop.round_learning_rate), the length is `epochs` passes (0 or None: as the run;
    max_steps is cleared: it was sized for the previous data), and the weights are TrainConfig's default
    (`auto`: from the new feedback's label counts; the run's config.yaml holds the numbers its own data gave;
    its column names are the run's data's, the feedback file has the canonical ones).
    """
    previous = None if source == BASE else runs.run_folder(source)
    if previous is not None and (previous / "config.yaml").is_file():
        values = TrainConfig.load(previous / "config.yaml").to_dict()
    else:
        values = TrainConfig().to_dict()
        values["model"] = presets.local_source(base_model.strip()) if (base_model or "").strip() else None
        if previous is not None:
            from kto_lite.runs import adapter_base

            values["model"] = adapter_base(previous, resolve=False)
    label = _round_label(previous, values)
    values.update(data=str(runs.stage_file(feedback, "feedback-")), resume_from_checkpoint=False,
                  output_dir=str(jobs.new_run_dir(runs.SETTINGS.runs_dir, label)), max_steps=None,
                  init_adapter=str(previous) if previous else None,
                  reference=reference if previous else "base", overwrite_output_dir=False)
    unset = TrainConfig()  # what described the run's own data does not describe the feedback file
    values.update(desirable_weight=unset.desirable_weight, undesirable_weight=unset.undesirable_weight,
                  columns=unset.columns)
    if epochs:
        values["num_epochs"] = float(epochs)
    config = TrainConfig.from_dict(values, source="next round")
    if previous is not None:  # the run's rate (as set, or its model's default), decayed as the loop's round 2
        from kto_lite.feedback.loop import round_learning_rate

        config = dataclasses.replace(config, learning_rate=round_learning_rate(config, 2))
    return config, previous


def _round_label(previous: Path | None, values: dict) -> str:
    """'<name>-round-<k>': k counts the init_adapter chain back to the first round."""
    if previous is None:
        return f"{Path(str(values.get('model') or 'demo').rstrip('/')).name}-round-1"
    from kto_lite.runs import run_settings

    rounds, run = 1, previous
    while rounds < 100:  # follows config.yaml files; a cycle cannot make it loop for ever
        parent = run_settings(run).get("init_adapter")
        if not parent:
            break
        rounds, run = rounds + 1, Path(parent)
    name = re.sub(r"^\d{8}-\d{6}-", "", previous.name)  # the stamp new_run_dir added
    name = re.sub(r"-round-\d+(-\d+)?$", "", name)  # the previous round's own suffix
    return f"{name}-round-{rounds + 1}"


# ---------------------------------------------------------------------- layout and wiring
def build() -> None:
    with gr.Tab("Rate", id="rate") as tab:
        gr.Markdown("Answer prompts several times with a run, rate each answer with the thumbs under it (or "
                    "let a judge rate them), add the ratings to the run's feedback file, then train the next "
                    "round from the run's adapter.")
        with gr.Row():
            source = gr.Dropdown(choices=chat.chat_choices(), value=None, label="run", scale=3,
                                 allow_custom_value=True,
                                 info="Its adapter answers; the ratings go to its feedback file.")
            base_model = gr.Textbox(label="base model (for 'Base model only')", scale=2,
                                    placeholder="empty: the built-in demo model")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                typed = gr.Textbox(label="prompts, one per line", lines=4,
                                   placeholder="What is 17 + 25?\nWhat is 40 - 13?")
                with gr.Row():
                    upload = gr.File(label="…or a prompt file (prompt or messages column)", file_types=DATA_TYPES,
                                     height=130, min_width=200)
                    sample = gr.Dropdown(choices=prompt_sample_choices(), value=NO_FILE, min_width=200,
                                         label="…or a shipped file")
                file_info = gr.Markdown()
            with gr.Column(scale=1):
                with gr.Row():
                    n = gr.Slider(1, MAX_ANSWERS, value=4, step=1, label="answers per prompt")
                    temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="temperature")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed", info="Same seed: same answers.")
                    max_prompts = gr.Number(8, precision=0, minimum=1, label="prompts from a file",
                                            info="The first ones.")
                    max_new = gr.Number(64, precision=0, minimum=1, label="max new tokens")
                system = gr.Textbox(label="system prompt (optional; kept in the feedback rows)")
                with gr.Row():
                    generate_button = gr.Button("Generate answers", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
        status = gr.Markdown()
        answers = gr.Chatbot(label="Answers: rate each one with the thumbs under it", height=460,
                             group_consecutive_messages=False, buttons=["copy"],
                             placeholder="Answers appear here, each with its own thumbs.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    judge = gr.Dropdown(choices=judge_choices(None, None), value=BY_HAND, allow_custom_value=True,
                                        label="judge", scale=3, min_width=320,
                                        info="Only judges that can rate these rows; or type regex:PATTERN.")
                    judge_button = gr.Button("Rate the unrated answers with the judge", scale=2, min_width=220)
                with gr.Accordion("judge options", open=False):
                    with gr.Row():
                        reference = gr.Textbox(label="reference column",
                                               placeholder="answer, reference, target or solution")
                        threshold = gr.Textbox(label="threshold", placeholder="none",
                                               info="For python judges returning a score.")
            with gr.Column(scale=2):
                rate_counts = gr.Markdown()
                save = gr.Button("Add the rated answers to the feedback file", variant="primary")
        gr.Markdown("### Train the next round\n`python -m kto_lite train` with the run's settings at half its "
                    "learning rate, its feedback file as data and `--init_adapter RUN`: training continues from "
                    "the run's adapter.")
        with gr.Row(equal_height=False):
            epochs = gr.Number(0, precision=None, minimum=0, label="epochs", info="0: as the run.")
            reference_model = gr.Radio(["base", "init_adapter"], value="base", label="KTO reference",
                                       info="base: adapters off. init_adapter: the run's frozen adapter "
                                       "(iterative KTO).")
            train_button = gr.Button("▶ Train the next round", variant="primary", scale=0, min_width=220)
        train_message = gr.Markdown()
        command = gr.Textbox(label="command line of the next round", lines=2, max_lines=6, interactive=False)
        batch = gr.State(None)  # the answers and their ratings (module docstring)
        prompt_file = gr.State(None)  # the prompt file chosen, with its prompts

    tab.select(chat.refresh_chat_choices, source, source, api_visibility="private")
    source.change(feedback_line, [source, base_model], rate_counts, api_visibility="private")
    upload.upload(on_prompt_upload, upload, [prompt_file, file_info], api_visibility="private")
    upload.clear(lambda: (None, ""), None, [prompt_file, file_info], api_visibility="private")
    sample.input(on_prompt_sample, sample, [prompt_file, file_info], api_visibility="private")
    gr.on([prompt_file.change, source.change, base_model.change], refresh_judges,
          [prompt_file, source, base_model, judge], judge, api_visibility="private", show_progress="hidden")
    generating = generate_button.click(
        generate, [source, base_model, typed, prompt_file, max_prompts, n, temperature, seed, max_new, system],
        [answers, status, batch], api_name="rate_generate", concurrency_limit=1, concurrency_id="chat")
    generating.then(counts, batch, rate_counts, api_visibility="private")
    stop.click(lambda: "■ Stopped.", None, status, cancels=[generating], api_visibility="private")
    answers.like(on_rate, batch, [batch, rate_counts], api_visibility="private")
    judge_button.click(judge_answers, [batch, judge, reference, threshold], [answers, rate_counts, batch],
                       api_name="rate_judge")
    save.click(save_ratings, batch, [rate_counts, batch], api_name="rate_save")
    train_button.click(train_next_round, [source, base_model, batch, epochs, reference_model],
                       [train_message, command], api_name="train_next_round", concurrency_limit=1,
                       concurrency_id="start")  # with the Train tab's Start: one start at a time
