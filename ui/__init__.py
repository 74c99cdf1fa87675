"""The kto_lite Gradio app: `python -m ui` (see docs/ui.md)."""
