"""The kto_lite app: Data -> Train -> Chat -> Rate -> Export, one tab each (ui/tabs/).

Each tab module holds its handlers (plain functions), its layout and its wiring; this file composes
them, with the welcome panel (ui/welcome.py) above the tabs until the first run. `python -m ui`
launches `demo`.
"""

from __future__ import annotations

import gradio as gr

from . import welcome
from .tabs import chat, data, export, rate, train

CSS = """
.kto-status { padding: 10px 14px; border: 1px solid var(--border-color-primary); border-radius: 8px; }
.kto-status progress { width: 100%; height: 10px; margin-top: 8px; display: block; }
.kto-status pre.kto-tail { max-height: 180px; overflow: auto; font-size: 12px; margin: 8px 0 0; white-space: pre; }
.kto-running, .kto-starting, .kto-stopping { color: #2563eb; font-weight: 600; }
.kto-finished { color: #16a34a; font-weight: 600; }
.kto-failed { color: #dc2626; font-weight: 600; }
.kto-stopped { color: #d97706; font-weight: 600; }
.kto-log .cm-editor { max-height: 320px; }  /* the log scrolls inside its box; the page stays short */
.kto-log .cm-scroller { overflow: auto; }
.kto-welcome { border: 1px solid var(--color-accent); border-radius: 10px; padding: 12px 16px; }
.kto-welcome button { white-space: pre-line; min-height: 64px; }
.kto-advice { padding-top: 28px; }
"""
THEME = gr.themes.Soft(primary_hue="indigo")


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="kto_lite") as demo:
        gr.Markdown("# kto_lite\nAlign a model from thumbs-up / thumbs-down feedback with KTO: "
                    "**Data → Train → Chat → Rate → Export**.")
        panel = welcome.build()
        with gr.Tabs() as tabs:  # (every block a tab creates must lie inside its gr.Tab: Tabs counts children)
            data_tab = data.build(demo)
            train_tab = train.build(demo, data_tab.state)
            chat.build(train_tab.finished)
            rate.build()
            export.build()
        welcome.wire(demo, *panel, tabs, data_tab, train_tab)
    return demo


demo = build_demo()
