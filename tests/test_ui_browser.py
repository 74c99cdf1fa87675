"""The app in a real browser: headless Debian chromium driven by playwright.

What a new user meets first: the welcome's guided start, the model choice with what it costs here,
empty optional numbers showing their default, the question before training the demo model on other
data, a run to its end and the before / after in the Chat tab. Then the tabs one by one: upload a
file, start a training, close the browser and come back, stop it (the stop saves the adapter), chat
with the result, open the export tab; and in the Rate tab the judges that fit the prompts, thumbs and
a judge, save, and the next round's command. A screenshot of each tab goes to artifacts/screenshots/.
Skipped when chromium is not installed, except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from test_ui_e2e import model_and_data, running_app

from kto_lite.demo import DEMO_DATA_DIR

pytestmark = pytest.mark.browser
DEMO_HELDOUT = DEMO_DATA_DIR / "demo_heldout.jsonl"
CHROMIUM = shutil.which("chromium")
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 3200}
CONTENT_BOTTOM = """Math.max(...[...document.querySelectorAll('.block, .form, button')]
    .filter(e => e.offsetParent !== null && !e.closest('footer')).map(e => e.getBoundingClientRect().bottom))"""
# ^ where the page's content ends (the container itself stretches to the viewport's height)
TIMEOUT_MS = int(os.environ.get("UI_TEST_TIMEOUT_MS", 120_000))

if CHROMIUM is None and os.environ.get("CI") != "true":
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
def page():
    assert CHROMIUM, "CI=true but chromium is missing: .ci/run installs it with apt"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def shot(page, name: str) -> None:
    """The page down to its end. The viewport is already taller than the page (see VIEWPORT): a
    capture that must resize the page makes the plots redraw half-way."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(800)  # let plots finish drawing
    height = page.evaluate(CONTENT_BOTTOM)
    page.screenshot(path=str(SHOTS / f"{name}.png"), clip={"x": 0, "y": 0, "width": VIEWPORT["width"],
                                                           "height": min(height + 24, VIEWPORT["height"])})


def field(page, label: str):
    """A form field by its label: a number box is named by it; a text box by it and its help text after."""
    return page.get_by_label(label, exact=True).or_(
        page.get_by_role("textbox", name=re.compile("^" + re.escape(label) + " ")))


def fill_number(page, label: str, value) -> None:
    box = field(page, label)
    box.fill(str(value))
    box.press("Tab")  # Gradio reads a number on blur


def started_or_not(page) -> None:
    """Wait for Start's answer; when it is not "Started", fail with what the page says instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    answer = page.get_by_text(re.compile(r"Started .* Expected to take about|Refused|Error|Busy")).first
    try:
        answer.wait_for()
    except PlaywrightTimeout:
        shot(page, "start-unanswered")
        body = " ".join(page.inner_text("body").split())
        raise AssertionError(f"Start answered nothing; the page (artifacts/screenshots/start-unanswered.png): "
                             f"{body[:3000]}") from None
    text = answer.inner_text()
    if not text.startswith("▶ Started"):
        shot(page, "start-refused")
        raise AssertionError(f"Start did not start a run: {text}")


def test_first_ten_minutes(tmp_path, page):
    """Welcome -> the demo's guided start -> the model choice -> a run to its end -> before / after in Chat."""
    from playwright.sync_api import expect

    from kto_lite import presets

    with running_app(tmp_path / "runs") as url:
        page.goto(url, wait_until="load")
        page.get_by_role("button", name=re.compile("Try the workflow in one minute")).wait_for()
        page.get_by_role("button", name=re.compile("Align a real small model on this machine")).wait_for()
        assert page.get_by_role("tab").all_inner_texts() == ["Data", "Train", "Chat", "Rate", "Export"]
        shot(page, "welcome")
        page.get_by_role("button", name=re.compile("Try the workflow in one minute")).click()
        page.get_by_text(re.compile("Training data:.*demo_kto.jsonl")).wait_for()  # the Train tab, data chosen
        model = page.get_by_label("model", exact=True)
        expect(model).to_have_value(re.compile("^Built-in demo model · a tiny arithmetic model"))
        page.get_by_text(re.compile(r"On this CPU: about \d+ minutes? for 400 examples")).wait_for()

        # unset numbers are empty, with the default they stand for (the demo model's own)
        rate = field(page, "learning rate")
        expect(rate).to_have_value("")
        expect(rate).to_have_attribute("placeholder", "empty: 0.001")
        expect(field(page, "max steps")).to_have_attribute("placeholder", "empty: not set")

        # the model choice: presets with a line each; the defaults and the cost follow the choice
        model.click()
        for preset in presets.PRESETS:
            page.get_by_role("option", name=f"{preset.name} · {preset.line}").wait_for()
        page.get_by_role("option", name=re.compile("^SmolLM2-135M-Instruct")).click()
        expect(rate).to_have_attribute("placeholder", "empty: 0.0002")
        page.get_by_text(re.compile(r"On this CPU: about .* \(measured on one core of a 2-core CPU")).wait_for()
        shot(page, "train-choice")
        model.click()
        page.get_by_role("option", name=re.compile("^Built-in demo model")).click()
        expect(rate).to_have_attribute("placeholder", "empty: 0.001")

        # the demo model on data that is not its own: asked first, with a real model named
        page.get_by_role("tab", name="Data").click()
        page.get_by_label("…or a shipped sample").click()
        page.get_by_role("option", name=re.compile("smollm2_addition_kto")).click()
        page.get_by_text(re.compile("600 examples")).first.wait_for()
        page.get_by_role("tab", name="Train").click()
        page.get_by_text(re.compile("Training data:.*smollm2_addition")).wait_for()
        page.get_by_role("button", name="▶ Start").click()
        warning = page.locator("p", has_text="only knows small arithmetic questions")
        expect(warning).to_contain_text("Choose a real model in model (e.g. SmolLM2-135M-Instruct")
        page.get_by_role("button", name="Train the demo model on it anyway").wait_for()
        assert not [p for p in (tmp_path / "runs").iterdir() if p.name[0] not in "._"]  # nothing started

        # back to the demo's own data: a short run to its end, then before / after in the Chat tab
        page.get_by_role("tab", name="Data").click()
        page.get_by_label("…or a shipped sample").click()
        page.get_by_role("option", name=re.compile("demo_kto.jsonl")).click()
        page.get_by_role("tab", name="Train").click()
        page.get_by_text(re.compile("Training data:.*demo_kto")).wait_for()
        fill_number(page, "max steps", 6)
        page.get_by_text("Judged success on held-out prompts").click()  # a closed accordion
        field(page, "eval prompts").fill(str(DEMO_HELDOUT))
        page.get_by_role("textbox", name=re.compile("^judge Judge of")).fill("number")
        fill_number(page, "eval steps", 3)
        page.get_by_text("Show as recipe").click()  # the settings as the server reads them, before Start
        page.get_by_role("button", name="Show the YAML and command for these settings").click()
        page.get_by_text(re.compile(r"--eval_steps 3 .*--eval_prompts \S*demo_heldout\.jsonl --judge number")).wait_for()
        page.get_by_role("button", name="▶ Start").click()
        started_or_not(page)
        expect(page.get_by_role("button", name=re.compile("Try the workflow in one minute"))).to_be_hidden()
        page.locator(".kto-finished").wait_for()
        # judged at steps 0, 3 and 6: plotted beside the loss, with what the judge saw first and last
        page.get_by_text("judged success on held-out prompts (eval_prompts + judge)").wait_for()
        answers = page.locator(".prose.kto-judged")
        expect(answers).to_contain_text("What the judge saw")
        expect(answers.locator("th")).to_have_text(["prompt", "step 0", "step 6"])
        shot(page, "train-judged")
        page.get_by_role("tab", name="Chat").click()
        page.get_by_text(re.compile(r"Before: \d of 8 right → after: \d of 8 right")).wait_for()
        shot(page, "3-chat")


def test_all_tabs_train_and_stop(tmp_path, page):
    model, data = model_and_data(tmp_path)
    with running_app(tmp_path / "runs") as url:
        page.goto(url)
        page.get_by_role("tab", name="Data").click()
        shot(page, "0-empty")

        page.locator("input[type=file]").first.set_input_files(str(data))
        page.get_by_text("Preview (first 50 examples)").wait_for()
        page.get_by_text(re.compile("suggested weights")).first.wait_for()
        shot(page, "1-data")

        page.get_by_role("tab", name="Train").click()
        page.get_by_text("Training data:").wait_for()
        if model:
            page.locator("label", has=page.get_by_text("model", exact=True)).locator("textarea").fill(model)
        page.get_by_text("LoRA, lengths and seed").click()  # a closed accordion
        for label, value in {"max steps": 400, "batch size": 2, "gradient accumulation steps": 1,
                             "max length": 64, "max prompt length": 32}.items():
            fill_number(page, label, value)
        page.get_by_role("button", name="▶ Start").click()
        page.get_by_text("Started").wait_for()
        page.locator(".kto-running").wait_for()
        page.get_by_text(re.compile(r"step ([5-9]|\d\d+) / 400")).wait_for()  # training, a few points plotted
        log_box = page.locator(".kto-log").bounding_box()
        assert log_box["height"] < 450, log_box  # the log scrolls inside its box; the page stays short
        shot(page, "2-train")

        # the browser closed mid-run: training goes on, and a new page finds it again
        browser = page.context.browser
        page.close()
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url, wait_until="load")
        page.get_by_role("tab", name="Train").click()
        page.locator(".kto-running").wait_for()
        page.get_by_role("button", name=re.compile("Stop")).first.click()
        page.locator(".kto-stopped").wait_for()
        page.get_by_text("Show as recipe").click()
        page.get_by_role("button", name="Show the YAML and command for these settings").click()
        page.get_by_text("Estimated GPU memory").wait_for()

        page.get_by_role("tab", name="Chat").click()
        page.get_by_role("button", name="Compare the chosen run").click()  # its own data's first prompts
        page.get_by_text(re.compile("on 8 the first prompts of its training data")).wait_for()
        page.get_by_role("checkbox", name=re.compile("side by side")).check()
        page.get_by_placeholder("Message").fill("What is 29 + 49?")
        page.get_by_role("button", name="Send").click()
        page.get_by_text(re.compile(r"tokens in [\d.]+ s")).wait_for()
        page.get_by_label("Like", exact=True).first.click()
        page.get_by_text(re.compile(r"1 liked / 0 disliked")).wait_for()
        page.get_by_role("tab", name="Export").click()
        page.get_by_text("needs about").wait_for()
        page.get_by_role("button", name="Make the zip").click()
        page.get_by_text("adapter.zip").first.wait_for()
        shot(page, "4-export")


def test_rate_answers_save_them_and_train_the_next_round(tmp_path, page):
    from playwright.sync_api import expect
    from test_rate_handlers import make_run, save_adapter

    runs = tmp_path / "runs"
    runs.mkdir()
    run = make_run(runs, save_adapter(tmp_path / "adapter"))
    with running_app(runs) as url:
        page.goto(url, wait_until="load")
        page.get_by_role("tab", name="Rate").click()
        # opening the tab picks the newest run; its feedback line says so (a click before that would send no run)
        page.get_by_text(re.compile(r"Feedback file.*20250101-000000-demo")).wait_for()
        # judges: by hand first; a reference judge only for prompts with a reference answer
        judge = page.get_by_label("judge", exact=True)
        expect(judge).to_have_value(re.compile("^by hand"))
        assert judge.evaluate("e => e.scrollWidth <= e.clientWidth"), "the judge's text is clipped"
        assert page.get_by_role("button", name="Rate the unrated answers with the judge").bounding_box()["height"] >= 36
        judge.click()
        page.get_by_role("option", name=re.compile("demo arithmetic")).wait_for()  # the demo model's answers
        assert page.get_by_role("option", name=re.compile("^(exact|number|contains)")).count() == 0
        page.keyboard.press("Escape")
        page.get_by_label("…or a shipped file").click()
        page.get_by_role("option", name=re.compile("demo_heldout")).click()
        judge.click()
        page.get_by_role("option", name=re.compile("^number: the answer has the same last number as the 'answer'")).wait_for()
        page.keyboard.press("Escape")
        page.get_by_label("…or a shipped file").click()
        page.get_by_role("option", name="none: the typed prompts").click()
        page.get_by_label("prompts, one per line").fill("What is 2 + 3?\nWhat is 10 - 4?")
        page.get_by_role("button", name="Generate answers").click()
        page.get_by_text(re.compile(r"2 / 2 prompts, 8 answers")).wait_for()
        page.get_by_label("Like", exact=True).first.click()
        page.get_by_text("1 liked · 0 disliked · 7 unrated").wait_for()
        page.get_by_label("Dislike", exact=True).nth(1).click()
        page.get_by_text("1 liked · 1 disliked · 6 unrated").wait_for()
        judge = page.get_by_label("judge", exact=True)
        judge.click()
        page.get_by_role("option", name=re.compile("demo arithmetic")).click()
        page.get_by_role("button", name="Rate the unrated answers with the judge").click()
        page.get_by_text(re.compile(r"6 rated by the judge")).wait_for()
        page.get_by_role("button", name="Add the rated answers to the feedback file").click()
        page.get_by_text("Added 8 rated answers").wait_for()
        rows = [json.loads(line) for line in (run / "feedback.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and rows[0]["label"] is True and rows[1]["label"] is False
        rated = {"liked": sum(r["label"] for r in rows), "disliked": sum(not r["label"] for r in rows)}
        page.get_by_role("button", name="▶ Train the next round").click()
        page.get_by_text(re.compile(r"Started .*-demo-round-2")).wait_for()
        command = page.get_by_label("command line of the next round")
        expect(command).to_have_value(re.compile(f"^python -m kto_lite train .*--init_adapter {re.escape(str(run))}"))
        assert "weight" not in command.input_value()  # the new feedback's own `auto` weights, not the run's
        shot(page, "rate")

        page.get_by_role("tab", name="Data").click()  # the new rows are offered as training data
        page.get_by_label(re.compile("feedback from the Chat tab")).click()
        page.get_by_role("option", name=f"{run.name}: {rated['liked']} liked / {rated['disliked']} disliked").wait_for()


def test_export_tab_makes_a_gguf(tmp_path, page):
    """A finished run (real adapter on the demo model): Export -> GGUF f16 -> the file, the Modelfile, the commands."""
    import json

    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_lite.demo import DEMO_MODEL_DIR

    runs = tmp_path / "runs"
    run = runs / "20250101-000000-gguf"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(run)
    AutoTokenizer.from_pretrained(DEMO_MODEL_DIR).save_pretrained(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": None, "load_in_4bit": True}))
    (run / "status.json").write_text(json.dumps({"status": "finished", "phase": "finished", "step": 1,
                                                 "total_steps": 1, "pid": None, "message": ""}))
    with running_app(runs) as url:
        page.goto(url, wait_until="load")
        page.get_by_role("tab", name="Export").click()
        page.get_by_text("needs about").wait_for()
        page.get_by_text("merged model, f16").click()
        page.get_by_role("button", name="Make the GGUF").click()
        run_it = page.locator(".block", has=page.get_by_text("run it", exact=True))
        run_it.get_by_text(re.compile("ollama create 20250101-000000-gguf")).wait_for()  # the commands box
        download = page.locator(".block", has=page.get_by_text("download", exact=True)).nth(1)
        download.get_by_text("20250101-000000-gguf-quantized-f16").first.wait_for()  # the files offered
        for suffix in (".gguf", ".Modelfile"):  # Gradio shows a name's stem and suffix apart
            download.get_by_text(suffix, exact=True).wait_for()
        assert (run / "gguf" / "20250101-000000-gguf-quantized-f16.gguf").is_file()
        shot(page, "5-export-gguf")
