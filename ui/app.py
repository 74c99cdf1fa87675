"""The kto_lite app: Data -> Train -> Chat -> Rate -> Export, one tab each.

Layout and wiring only; the handlers are plain functions in handlers.py, chat_handlers.py and
rate_handlers.py, and
the train form is generated from TrainConfig's fields (form.py). `python -m ui` launches `demo`.
"""

from __future__ import annotations

import math

import gradio as gr

from kto_lite.data.read import SUFFIXES

from . import chat_handlers as ch
from . import form
from . import handlers as h
from . import rate_handlers as rh

TIMER_SECONDS = 2.0
DATA_TYPES = list(SUFFIXES)
SECTION_TITLES = {"basic": "Model and schedule", "kto": "KTO loss", "lora": "LoRA, lengths and seed",
                  "advanced": "Advanced"}
CSS = """
.kto-status { padding: 10px 14px; border: 1px solid var(--border-color-primary); border-radius: 8px; }
.kto-status progress { width: 100%; height: 10px; margin-top: 8px; display: block; }
.kto-running, .kto-starting, .kto-stopping { color: #2563eb; font-weight: 600; }
.kto-finished { color: #16a34a; font-weight: 600; }
.kto-failed { color: #dc2626; font-weight: 600; }
.kto-stopped { color: #d97706; font-weight: 600; }
"""
THEME = gr.themes.Soft(primary_hue="indigo")


def _field(spec: form.FieldSpec):
    """One input component for one TrainConfig field: its type, default, help text and choices."""
    info = spec.help + (" 0: not set." if spec.optional and spec.kind in ("integer", "number") else "")
    common = dict(label=spec.label, info=info, value=spec.default, min_width=220)
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), **common)
    if spec.kind == "tristate":
        return gr.Radio(choices=list(form.TRISTATE), **common)
    if spec.kind == "integer":
        return gr.Number(precision=0, minimum=0, **common)
    if spec.kind == "number":
        step = 10 ** math.floor(math.log10(abs(spec.default))) / 10 if spec.default else 0.01
        return gr.Number(step=step, minimum=0, **common)
    placeholder = "built-in demo model" if spec.name == "model" else None
    return gr.Textbox(placeholder=placeholder, **common)


def _train_form() -> list:
    """The form's components in SPECS order, laid out by section: text fields on their own row, others in pairs."""
    made = {}
    for section, title in SECTION_TITLES.items():
        specs = [s for s in h.SPECS if form.section_of(s.name) == section]
        rows, pair = [], []
        for spec in specs:
            if spec.kind == "text" and not spec.numeric:
                rows.append([spec])
            else:
                pair.append(spec)
                if len(pair) == 2:
                    rows.append(pair)
                    pair = []
        rows += [pair] if pair else []
        with gr.Accordion(title, open=section in ("basic", "kto")):
            for row in rows:
                with gr.Row():
                    for spec in row:
                        made[spec.name] = _field(spec)
    return [made[s.name] for s in h.SPECS]


def _plot(title: str, y_title: str, y_axis_format: str | None = None) -> gr.LinePlot:
    """A live plot of metrics.jsonl (jobs.metric_frames): step on x, one line per series."""
    return gr.LinePlot(x="step", y="value", color="series", title=title, x_title="step", y_title=y_title,
                       y_axis_format=y_axis_format, height=220)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="kto_lite") as demo:
        gr.Markdown("# kto_lite\nAlign a model from thumbs-up / thumbs-down feedback with KTO on one GPU: "
                    "**Data → Train → Chat → Rate → Export**.")
        data_state = gr.State(None)  # what the Train tab trains on (handlers.describe_data)
        source_state = gr.State(None)  # the file last chosen in the Data tab, for column mapping
        progress_sig = gr.State(None)

        # ------------------------------------------------------------------ Data
        with gr.Tab("Data", id="data"):
            with gr.Row():
                with gr.Column(scale=2):
                    upload = gr.File(label="Upload labeled data (.jsonl .json .csv .tsv .parquet)",
                                     file_types=DATA_TYPES)
                    sample = gr.Dropdown(choices=list(h.sample_files()), value=None, label="…or a shipped sample")
                    feedback = gr.Dropdown(choices=[], value=None, label="…or feedback from the Chat tab",
                                           info="Rated replies, one round of KTO after another.")
                with gr.Column(scale=3):
                    summary = gr.Markdown("No data yet: upload a file or pick a sample.")
                    problems = gr.Markdown()
            with gr.Group(visible=False) as mapping:
                gr.Markdown("**Map columns:** which column of your file holds each part? Use prompt + completion "
                            "+ label, or messages + label, or chosen + rejected (+ prompt).")
                with gr.Row():
                    map_boxes = [gr.Dropdown(choices=[h.NOT_IN_FILE], value=h.NOT_IN_FILE, label=t, min_width=120)
                                 for t in h.MAP_TARGETS]
                map_button = gr.Button("Apply mapping", variant="primary")
            preview = gr.Dataframe(headers=["row", "label", "prompt", "completion"], label="Preview (first 50 examples)",
                                   wrap=True, interactive=False, max_height=420,
                                   column_widths=["8%", "14%", "39%", "39%"])
            with gr.Accordion("Full data report", open=False):
                report = gr.Code(language=None, label="python -m kto_lite data", lines=8)

        # ------------------------------------------------------------------ Train
        with gr.Tab("Train", id="train"):
            banner = gr.Markdown(h.data_banner(None))
            with gr.Row():
                with gr.Column(scale=2):
                    run_name = gr.Textbox(label="run name (optional)", placeholder="e.g. support-bot-round-2",
                                          info="The run folder is runs/<date>-<time>-<name>.")
                    fields = _train_form()
                with gr.Column(scale=3):
                    with gr.Row():
                        start = gr.Button("▶ Start", variant="primary")
                        stop = gr.Button("■ Stop and save", variant="stop")
                        resume = gr.Button("Resume")
                    message = gr.Markdown()
                    run_pick = gr.Dropdown(choices=[("Latest job (follows new runs)", h.LATEST)], value=h.LATEST,
                                           label="run shown", allow_custom_value=True)
                    status = gr.HTML(h.status_html(None, None))
                    with gr.Row():
                        loss_plot = _plot("loss", "loss")
                        rewards_plot = _plot("rewards (beta x log-ratio)", "reward")
                    with gr.Row():
                        kl_plot = _plot("kl (the z0 reference point)", "kl")
                        lr_plot = _plot("learning rate", "learning rate", ".1e")
                    log = gr.Code(language=None, label="train.log (last lines)", lines=10, max_lines=14,
                                  wrap_lines=True)
            with gr.Accordion("Show as recipe", open=False):
                recipe_button = gr.Button("Show the YAML and command for these settings", size="sm")
                with gr.Row():
                    recipe_yaml = gr.Code(language="yaml", label="config.yaml", lines=6, wrap_lines=True)
                    recipe_cmd = gr.Code(language="shell", label="command line", lines=3, wrap_lines=True)
                memory = gr.Markdown()
            timer = gr.Timer(TIMER_SECONDS)

        # ------------------------------------------------------------------ Chat
        with gr.Tab("Chat", id="chat") as chat_tab:
            with gr.Row():
                source = gr.Dropdown(choices=ch.chat_choices(), value=None, label="model", scale=3,
                                     allow_custom_value=True,
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
            chat_turns = gr.State(ch.new_turns())  # each reply's system prompt and seed (feedback rows keep them)
            with gr.Accordion("Generation settings", open=False):
                system_prompt = gr.Textbox(label="system prompt", lines=2)
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature", info="0: greedy")
                    top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p")
                    max_new = gr.Slider(8, 2048, value=256, step=8, label="max new tokens")

        # ------------------------------------------------------------------ Rate
        with gr.Tab("Rate", id="rate") as rate_tab:
            gr.Markdown("Answer prompts several times with a run, rate each answer with the thumbs under it (or "
                        "let a judge rate them), add the ratings to the run's feedback file, then train the next "
                        "round from the run's adapter.")
            with gr.Row():
                rate_source = gr.Dropdown(choices=ch.chat_choices(), value=None, label="run", scale=3,
                                          allow_custom_value=True,
                                          info="Its adapter answers; the ratings go to its feedback file.")
                rate_base_model = gr.Textbox(label="base model (for 'Base model only')", scale=2,
                                             placeholder="empty: the built-in demo model")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    rate_typed = gr.Textbox(label="prompts, one per line", lines=4,
                                            placeholder="What is 17 + 25?\nWhat is 40 - 13?")
                    with gr.Row():
                        rate_upload = gr.File(label="…or a prompt file (prompt or messages column)",
                                              file_types=DATA_TYPES, height=130, min_width=200)
                        rate_sample = gr.Dropdown(choices=rh.prompt_sample_choices(), value=rh.NO_FILE,
                                                  min_width=200, label="…or a shipped file")
                    rate_file_info = gr.Markdown()
                with gr.Column(scale=1):
                    with gr.Row():
                        rate_n = gr.Slider(1, rh.MAX_ANSWERS, value=4, step=1, label="answers per prompt")
                        rate_temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="temperature")
                    with gr.Row():
                        rate_seed = gr.Number(0, precision=0, label="seed", info="Same seed: same answers.")
                        rate_max_prompts = gr.Number(8, precision=0, minimum=1, label="prompts from a file",
                                                     info="The first ones.")
                        rate_max_new = gr.Number(64, precision=0, minimum=1, label="max new tokens")
                    rate_system = gr.Textbox(label="system prompt (optional; kept in the feedback rows)")
                    with gr.Row():
                        rate_generate = gr.Button("Generate answers", variant="primary")
                        rate_stop = gr.Button("Stop", variant="stop")
            rate_status = gr.Markdown()
            rate_answers = gr.Chatbot(label="Answers: rate each one with the thumbs under it", height=460,
                                      group_consecutive_messages=False, buttons=["copy"],
                                      placeholder="Answers appear here, each with its own thumbs.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    with gr.Row():
                        rate_judge = gr.Dropdown(choices=rh.JUDGES, value="exact", allow_custom_value=True,
                                                 label="judge", scale=3, info="exact, contains, number, "
                                                 "regex:PATTERN or python:module:function")
                        rate_reference = gr.Textbox(label="reference column", scale=2,
                                                    placeholder="answer, reference, target or solution")
                        rate_threshold = gr.Textbox(label="threshold", scale=1, placeholder="none",
                                                    info="For python judges returning a score.")
                    rate_judge_button = gr.Button("Rate the answers you did not rate with the judge", size="sm")
                with gr.Column(scale=2):
                    rate_counts = gr.Markdown()
                    rate_save = gr.Button("Add the rated answers to the feedback file", variant="primary")
            gr.Markdown("### Train the next round\n`python -m kto_lite train` with the run's settings at half its "
                        "learning rate, its feedback file as data and `--init_adapter RUN`: training continues from "
                        "the run's adapter.")
            with gr.Row(equal_height=False):
                rate_epochs = gr.Number(0, precision=None, minimum=0, label="epochs", info="0: as the run.")
                rate_reference_model = gr.Radio(["base", "init_adapter"], value="base", label="KTO reference",
                                                info="base: adapters off. init_adapter: the run's frozen adapter "
                                                "(iterative KTO).")
                rate_train = gr.Button("▶ Train the next round", variant="primary", scale=0, min_width=220)
            rate_train_message = gr.Markdown()
            rate_command = gr.Textbox(label="command line of the next round", lines=2, max_lines=6,
                                      interactive=False)
            rate_batch = gr.State(None)  # the answers and their ratings (rate_handlers module docstring)
            rate_file = gr.State(None)  # the prompt file chosen, with its prompts

        # ------------------------------------------------------------------ Export
        with gr.Tab("Export", id="export") as export_tab:
            export_run = gr.Dropdown(choices=[], label="run", info="Runs with a saved adapter.",
                                     allow_custom_value=True)
            merge_from = gr.Radio(ch.MERGE_CHOICES, value="quantized", label="merge the adapter",
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
                                        visible=False)
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### GGUF (llama.cpp, Ollama, LM Studio)\nOne file with the tokenizer and chat "
                                "template, and an Ollama Modelfile next to it.")
                    gguf_kind = gr.Radio(ch.GGUF_CHOICES, value="f16", label="GGUF")
                    gguf_button = gr.Button("Make the GGUF")
                    gguf_files = gr.File(label="download", interactive=False, file_count="multiple", height=100)
                    gguf_commands = gr.Code(language="shell", label="run it", lines=2, wrap_lines=True)
                    gguf_log = gr.Code(language=None, label="export output", lines=3, max_lines=12, wrap_lines=True,
                                       visible=False)
                with gr.Column():
                    gr.Markdown("### Hugging Face Hub\nThe adapter with a model card (settings, metrics, data "
                                "summary, how to load it). Needs a token: HF_TOKEN or `hf auth login`.")
                    hub_repo = gr.Textbox(label="repo id", placeholder="your-name/my-kto-model")
                    hub_private = gr.Checkbox(label="private repo", value=True)
                    hub_button = gr.Button("Push to the Hub")
                    hub_message = gr.Markdown()
                    hub_log = gr.Code(language=None, label="upload output", lines=3, max_lines=12, wrap_lines=True,
                                      visible=False)
            snippet_kind = gr.Radio(["adapter", "merged"], value="adapter", label="load it with transformers / peft")
            snippet = gr.Code(language="python", label="Python", lines=10, wrap_lines=True)

        # ================================================================== wiring
        data_outputs = [summary, preview, problems, report, mapping, *map_boxes, data_state]
        upload.upload(h.on_upload, upload, [*data_outputs, source_state], api_name="upload")
        sample.input(h.on_sample, sample, [*data_outputs, source_state], api_name="sample")
        feedback.input(h.on_feedback_file, feedback, [*data_outputs, source_state], api_name="feedback_data")
        feedback.focus(h.refresh_feedback_choices, feedback, feedback, api_visibility="private")
        map_button.click(h.on_map_columns, [source_state, *map_boxes], data_outputs, api_name="map_columns")
        data_state.change(h.data_banner, data_state, banner, api_visibility="private")

        recipe_button.click(h.show_recipe, [data_state, run_name, *fields], [recipe_yaml, recipe_cmd, memory],
                            api_name="recipe")
        start.click(h.start_training, [data_state, run_name, *fields], [message, run_pick], api_name="start",
                    concurrency_limit=1)
        stop.click(h.stop_training, run_pick, message, api_name="stop")
        resume.click(h.resume_training, run_pick, message, api_name="resume", concurrency_limit=1)
        plots = [loss_plot, rewards_plot, kl_plot, lr_plot]
        progress_outputs = [status, log, *plots, run_pick, progress_sig]
        timer.tick(h.progress, [run_pick, progress_sig], progress_outputs, api_visibility="private",
                   show_progress="hidden")
        # a run picked by hand is drawn at once (no previous signature: nothing is skipped)
        run_pick.input(h.progress, [run_pick, gr.State(None)], progress_outputs, api_name="train_progress")

        source.change(ch.source_changed, [source, side_by_side],
                      [tuned_chat, base_chat, feedback_info, chat_turns], api_visibility="private")
        chat_inputs = [box, tuned_chat, base_chat, source, base_model, side_by_side, system_prompt, temperature,
                       top_p, max_new, chat_turns]
        chat_outputs = [box, tuned_chat, base_chat, chat_status, chat_turns]
        sending = [send.click(ch.chat_send, chat_inputs, chat_outputs, api_name="chat", concurrency_limit=1,
                               concurrency_id="chat"),
                   box.submit(ch.chat_send, chat_inputs, chat_outputs, api_visibility="private",
                              concurrency_limit=1, concurrency_id="chat"),
                   side_by_side.change(ch.base_column, [source, side_by_side, tuned_chat, base_chat, chat_turns,
                                                        base_model, temperature, top_p, max_new],
                                       [base_chat, chat_status, chat_turns], api_visibility="private",
                                       concurrency_limit=1, concurrency_id="chat")]
        chat_stop.click(ch.stop_chat, None, chat_status, cancels=sending, api_visibility="private")
        clear.click(ch.clear_chat, None, [tuned_chat, base_chat, chat_status, chat_turns], api_visibility="private")
        for chatbot, column in ((tuned_chat, "tuned"), (base_chat, "base")):
            chatbot.like(ch.on_like, [chatbot, source, base_model, chat_turns, gr.State(column)], feedback_info,
                         api_visibility="private")
        gr.api(ch.api_record_feedback, api_name="record_feedback")
        chat_tab.select(ch.refresh_chat_choices, source, source, api_visibility="private")

        rate_tab.select(ch.refresh_chat_choices, rate_source, rate_source, api_visibility="private")
        rate_source.change(rh.feedback_line, [rate_source, rate_base_model], rate_counts, api_visibility="private")
        rate_upload.upload(rh.on_prompt_upload, rate_upload, [rate_file, rate_file_info], api_visibility="private")
        rate_upload.clear(lambda: (None, ""), None, [rate_file, rate_file_info], api_visibility="private")
        rate_sample.input(rh.on_prompt_sample, rate_sample, [rate_file, rate_file_info], api_visibility="private")
        generating = rate_generate.click(
            rh.generate, [rate_source, rate_base_model, rate_typed, rate_file, rate_max_prompts, rate_n,
                          rate_temperature, rate_seed, rate_max_new, rate_system],
            [rate_answers, rate_status, rate_batch], api_name="rate_generate", concurrency_limit=1,
            concurrency_id="chat")
        generating.then(rh.counts, rate_batch, rate_counts, api_visibility="private")
        rate_stop.click(lambda: "■ Stopped.", None, rate_status, cancels=[generating], api_visibility="private")
        rate_answers.like(rh.on_rate, rate_batch, [rate_batch, rate_counts], api_visibility="private")
        rate_judge_button.click(rh.judge_answers, [rate_batch, rate_judge, rate_reference, rate_threshold],
                                [rate_answers, rate_counts, rate_batch], api_name="rate_judge")
        rate_save.click(rh.save_ratings, rate_batch, [rate_counts, rate_batch], api_name="rate_save")
        rate_train.click(rh.train_next_round, [rate_source, rate_base_model, rate_batch, rate_epochs,
                                               rate_reference_model], [rate_train_message, rate_command],
                         api_name="train_next_round", concurrency_limit=1)

        export_tab.select(ch.export_choices, export_run, export_run, api_visibility="private")
        export_run.change(ch.merge_notice, export_run, merge_info, api_visibility="private").then(
            ch.load_code, [export_run, snippet_kind], snippet, api_visibility="private")
        snippet_kind.change(ch.load_code, [export_run, snippet_kind], snippet, api_visibility="private")
        zip_button.click(ch.zip_run, export_run, [zip_file, zip_message], api_name="zip")
        merge_button.click(ch.merge_run, [export_run, merge_from], [merge_log, snippet], api_name="merge",
                           concurrency_limit=1, concurrency_id="export").then(
            ch.snippet_after_merge, export_run, snippet_kind, api_visibility="private")  # the radio follows
        gguf_button.click(ch.gguf_run, [export_run, gguf_kind, merge_from], [gguf_log, gguf_files, gguf_commands],
                          api_name="gguf", concurrency_limit=1, concurrency_id="export")
        hub_button.click(ch.push_run, [export_run, hub_repo, hub_private], [hub_log, hub_message], api_name="push")

        demo.load(h.progress, [run_pick, progress_sig], progress_outputs, api_visibility="private")
        demo.load(h.refresh_feedback_choices, feedback, feedback, api_visibility="private")
    return demo


demo = build_demo()
