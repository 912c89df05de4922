"""The builder and dashboard in a real JupyterLab 4 and a real Notebook 7, driven by chromium through playwright.

A generated notebook loads the extension and opens the builder on the embedded default; the test goes through
what a user does (see `_drive`): Ready, typing that re-estimates, two configs that are not Ready and why,
Launch with its real states, the live chart growing while frame gaps are measured, Stop, Resume, Stop — and
asserts the browser logged no errors. Screenshots and the measured figures are kept for people to look at
(bench/results/screenshots-tmp/, or $NBTUNE_SCREENSHOTS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("NBTUNE_SCREENSHOTS") or ROOT / "bench" / "results" / "screenshots-tmp")

# Enough steps that the run is still going when Stop is clicked, on a slow machine too (~6 s per 400 here).
CONFIG = {"training.max_steps": 2000, "training.log_every": 1, "training.eval_every": 10,
          "training.micro_batch_size": 4, "data.max_samples": 64, "data.max_eval_samples": 8}


def _requirements() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (python) is not installed: pip install playwright"
    if not Path(CHROMIUM).exists():
        return "chromium is not installed: apt-get install -y chromium (do not run `playwright install`)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The image classifier's notebook: the embedded ViT on nbtune:shapes, short enough to watch to the end.
IMAGE_CONFIG = ('nbtune.TuneConfig(model={"name_or_path": "nbtune:tiny-vit", "task": "image-cls"}, '
                'data={"source": "nbtune:shapes"}, training={"max_steps": 40, "log_every": 1, "eval_every": 10})')

# The captioner's notebook starts from the text default; the test chooses image-to-text on the Task tab, which
# swaps in the embedded captioner and its captions. 300 steps: held-out exact match from 0 to about 1 (~15 s here).
CAPTION_CONFIG = ('nbtune.TuneConfig(training={"max_steps": 300, "micro_batch_size": 16, "log_every": 5, '
                  '"eval_every": 100})')

# The diffusion notebook starts from the text default too; choosing text-to-image swaps in the tiny pipeline and
# its DreamBooth concept. 40 steps: a short run whose three evaluations each draw the 32 held-out prompts.
DRAW_CONFIG = ('nbtune.TuneConfig(training={"max_steps": 40, "micro_batch_size": 8, "log_every": 2, '
               '"eval_every": 20})')


def _notebook(path: Path, config: str = f"nbtune.TuneConfig().replace(**{CONFIG!r})") -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext nbtune"),
        nbformat.v4.new_code_cell(
            "import nbtune\nfrom nbtune.widgets import Builder\n\n"
            f"config = {config}\n"
            "builder = Builder(config, store='store')\nbuilder"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


# The server command line per app: JupyterLab, and Notebook 7 (jupyter_server + Lab components, its own shell).
APPS = {
    "lab": ["--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
    "notebook": [],
}


def _server(tmp_path: Path, app: str, config: str | None = None):
    """Start `jupyter <app>` on a generated notebook (of `config`, a TuneConfig expression; default: the
    embedded text default) with isolated Jupyter dirs; yield its base URL and token."""
    missing = _requirements()
    if missing:
        if os.environ.get("CI"):  # CI installs chromium: a missing browser there is a failure, not a skip
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)
    home = tmp_path / "jupyter"
    env = {**os.environ, "NBTUNE_HOME": str(tmp_path / "store"), "NBTUNE_STATIC_PNG": "0"}
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "run"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("IPYTHONDIR", "ipython")):
        (home / sub).mkdir(parents=True)
        env[var] = str(home / sub)
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    # The Python kernel of this environment (the data dir is isolated, so register it there).
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(home / "prefix")], env=env,
                   check=True, capture_output=True)
    env["JUPYTER_PATH"] = str(home / "prefix" / "share" / "jupyter")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "builder.ipynb", *([config] if config else []))
    port, token = _free_port(), "nbtune-browser-test"
    log = tmp_path / f"{app}.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", app, "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--allow-root",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}", "--ServerApp.port_retries=0",
         *APPS[app]],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"jupyter {app} did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.3)
        yield {"base": base, "token": token}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture
def lab(tmp_path: Path):
    yield from _server(tmp_path, "lab")


@pytest.fixture
def notebook7(tmp_path: Path):
    yield from _server(tmp_path, "notebook")


@pytest.fixture
def image_lab(tmp_path: Path):
    yield from _server(tmp_path, "lab", IMAGE_CONFIG)


@pytest.fixture
def caption_lab(tmp_path: Path):
    yield from _server(tmp_path, "lab", CAPTION_CONFIG)


@pytest.fixture
def draw_lab(tmp_path: Path):
    yield from _server(tmp_path, "lab", DRAW_CONFIG)


def _kernel_idle(server: dict) -> bool:
    with urllib.request.urlopen(f"{server['base']}/api/sessions?token={server['token']}", timeout=5) as r:
        sessions = json.load(r)
    return bool(sessions) and all(s["kernel"]["execution_state"] == "idle" for s in sessions)


def _points(page) -> int:  # noqa: ANN001
    """Points of the live chart's train-loss trace, as plotly holds them in the page."""
    return page.evaluate("""() => {
        const plots = [...document.querySelectorAll('.js-plotly-plot')];
        let n = 0;
        for (const p of plots) for (const t of (p.data || [])) if (t.name === 'train loss') n = Math.max(n, t.x.length);
        return n;
    }""")


# ----- the scenario, step by step (JupyterLab and Notebook 7 run the same one) -------------------------------

# Records every text the run's status badge shows, so short states (loading the model) are not missed.
WATCH_STATES = """() => {
    window.__nbtuneStates = [];
    const seen = () => {
        for (const el of document.querySelectorAll('.nbtune-status')) {
            const t = el.innerText.trim();
            if (t && window.__nbtuneStates[window.__nbtuneStates.length - 1] !== t) window.__nbtuneStates.push(t);
        }
    };
    new MutationObserver(seen).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""

# Frame gaps (ms) between animation frames while training: what a user feels as the page's latency.
START_FRAMES = """() => {
    window.__frames = []; let last = performance.now(); window.__framesOn = true;
    const tick = (t) => { window.__frames.push(t - last); last = t; if (window.__framesOn) requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
}"""
STOP_FRAMES = "() => { window.__framesOn = false; return window.__frames; }"


def _bar_text(page) -> str:  # noqa: ANN001
    bar = page.query_selector(".nbtune-memory-bar")
    return bar.inner_text() if bar is not None else ""


def _type_into(page, field: str, text: str) -> float:  # noqa: ANN001
    """Type `text` into a form field key by key, as a user does; the time of the last keystroke."""
    box = page.locator(f".nbtune-field-{field} input")
    box.click()
    box.press("Control+a")
    box.press_sequentially(text, delay=40)
    return time.monotonic()


def _show_tab(page, title: str) -> None:  # noqa: ANN001
    page.click(f".nbtune-builder .lm-TabBar-tab:has-text('{title}')")


# Elements of the builder that stick out past its right edge, or labels cut short (an ellipsis hides text).
CLIPPED = """() => {
    const builder = document.querySelector('.nbtune-builder');
    const edge = builder.getBoundingClientRect().right + 1;
    const out = [];
    for (const el of builder.querySelectorAll('*')) {
        const r = el.getBoundingClientRect();
        if (!r.width || el.closest('.lm-TabBar')) continue;
        const label = el.classList.contains('widget-label') || el.tagName === 'SELECT';
        if (r.right > edge || (label && el.scrollWidth > el.clientWidth + 1))
            out.push(`${el.tagName}.${[...el.classList].join('.')} "${(el.innerText || el.value || '').slice(0, 40)}"`);
    }
    return out;
}"""


def _never_clips(page, measured: dict) -> None:  # noqa: ANN001
    """At 1,000 and 1,400 px wide, nothing in the builder is cut off (then back to the test's width)."""
    for width in (1000, 1400):
        page.set_viewport_size({"width": width, "height": 1500})
        page.wait_for_timeout(500)
        for tab in ("Model", "Method", "Training", "Distributed"):
            _show_tab(page, tab)
            clipped = page.evaluate(CLIPPED)
            assert not clipped, f"at {width} px, {tab} tab: {clipped[:5]}"
    page.set_viewport_size({"width": 1300, "height": 1500})
    measured["never_clips_px"] = [1000, 1400]


def _typing_follows(page, measured: dict) -> None:  # noqa: ANN001
    """Typing a new max length re-estimates within a second of the last keystroke (no blur, no Enter): the bar
    shows what `estimate_memory` says for the typed value."""
    import nbtune
    from nbtune.estimator import estimate_memory
    from nbtune.units import format_bytes

    expected = estimate_memory(nbtune.TuneConfig().replace(**{**CONFIG, "data.max_length": 64}), gpu="t4")
    shown = f"{format_bytes(expected.total_bytes)} estimated"
    assert shown not in _bar_text(page), f"the bar shows {shown!r} before the typing"
    _show_tab(page, "Data")
    typed = _type_into(page, "data-max-length", "64")
    deadline = typed + 10
    while shown not in _bar_text(page):
        assert time.monotonic() < deadline, f"the estimate did not follow the typing ({_bar_text(page)!r})"
        time.sleep(0.02)
    measured["typing_to_estimate_s"] = round(time.monotonic() - typed, 3)
    # it follows the typing, not a blur or Enter (the deadline above); how fast is the machine's (0.32 s on the
    # Intel VM of browser-2026-12-01.md, 0.4-1.0 s on a slower AMD VM): recorded, bound loosely
    assert measured["typing_to_estimate_s"] < 3.0, measured


def _not_ready(page, model: str, reason: str) -> str:  # noqa: ANN001
    """Type a model name; the builder says it is not ready and why (a regex on the reason)."""
    import re

    _show_tab(page, "Model")
    _type_into(page, "model-name-or-path", model)
    deadline = time.monotonic() + 60
    while True:
        status = page.query_selector(".nbtune-not-ready")
        said = status.inner_text() if status is not None else ""
        if re.search(reason, said, re.I):
            break
        assert time.monotonic() < deadline, f"{model}: no not-ready reason matching {reason!r} (said {said!r})"
        time.sleep(0.1)
    assert page.locator(".nbtune-builder button:has-text('Launch')").is_disabled()
    return said


def _points_grow(page, at_least: int) -> int:  # noqa: ANN001
    deadline = time.monotonic() + 90
    while _points(page) < at_least:
        assert time.monotonic() < deadline, f"the live chart stayed at {_points(page)} points"
        time.sleep(0.25)
    return _points(page)


FRAME_WINDOW_S = 6.0  # seconds of training whose frame gaps are measured


def _frame_latency(page, seconds: float, measured: dict) -> None:  # noqa: ANN001
    """Frame gaps over `seconds` of training, and how long a tab click takes to show its tab."""
    page.evaluate(START_FRAMES)
    time.sleep(seconds / 2)
    clicked = time.monotonic()
    _show_tab(page, "Training")
    page.wait_for_selector(".nbtune-field-training-learning-rate input", state="visible")
    measured["tab_click_s"] = round(time.monotonic() - clicked, 3)
    time.sleep(seconds / 2)
    frames = sorted(page.evaluate(STOP_FRAMES))
    measured["frames"] = len(frames)
    measured["frame_p50_ms"] = round(frames[len(frames) // 2], 1)
    measured["frame_p95_ms"] = round(frames[int(len(frames) * 0.95)], 1)
    measured["frame_max_ms"] = round(frames[-1], 1)
    # redraws and the tab click: gaps well above this page's typical frame (a slow machine's frames are all long)
    measured["long_frames"] = sum(gap > 3 * measured["frame_p50_ms"] for gap in frames)


def _shoot_dashboard(page, shoot, stage: str) -> None:  # noqa: ANN001
    """The page with the run's chart scrolled into view (where a user looks once the run is going)."""
    page.wait_for_timeout(600)  # the live chart may just be giving way to the record
    page.evaluate("() => { const p = [...document.querySelectorAll('.js-plotly-plot')].pop(); "
                  "if (p) p.scrollIntoView({block: 'center'}); }")
    page.wait_for_timeout(300)
    shoot(stage, page)


def _step(page) -> int:  # noqa: ANN001
    import re

    """The step the run's dashboard (under the builder, in the second cell) says it is at."""
    found = re.findall(r"step (\d+)/", page.locator(".jp-CodeCell").nth(1).inner_text())
    return int(found[-1]) if found else 0


def _drive(server: dict, path: str, shots: dict[str, str], known: tuple[tuple[str, str], ...] = ()) -> dict:
    """Open the generated notebook at `path`, Run All, and go through what a user does, asserting each state:

    the builder is Ready; typing re-estimates within a second; a model too big for the GPU and one that is not
    cached offline are not Ready, with the reason; Launch shows the run's real states (never "queued" on an idle
    kernel); the live chart grows while the page stays responsive (frame gaps measured); Stop; Resume continues
    the step count; Stop again. Returns what was measured.

    `shots` names the screenshots to keep (under SHOTS) by stage; `known` lists page errors of the Jupyter
    frontend itself to tolerate, as (message, stack fragment) pairs that must both match.
    """
    from playwright.sync_api import sync_playwright

    def shoot(stage: str, target) -> None:  # noqa: ANN001
        if stage in shots:
            target.screenshot(path=str(SHOTS / shots[stage]))

    SHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    measured: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        measured["chromium"] = browser.version
        page = browser.new_page(viewport={"width": 1300, "height": 1500})
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: None if any(m in e.message and f in (e.stack or "") for m, f in known)
                else errors.append(f"page: {e}"))
        try:
            builder = _open_builder(server, page, path)
            shoot("builder", builder)
            _never_clips(page, measured)
            _typing_follows(page, measured)
            measured["too_big"] = _not_ready(page, "meta-llama/Llama-2-70b-hf", r"GiB over")
            shoot("too-big", builder)
            measured["offline"] = _not_ready(page, "Qwen/Qwen2.5-0.5B", r"cache|offline")
            shoot("offline", builder)
            _show_tab(page, "Model")
            _type_into(page, "model-name-or-path", "nbtune:tiny")
            page.wait_for_selector(".nbtune-ready", timeout=60_000)
            _run_stop_resume(page, measured, shoot)
        finally:
            shoot("last-page", page)
            if "last-outputs" in shots:
                (SHOTS / shots["last-outputs"]).write_text(page.inner_text(".jp-NotebookPanel"))
            browser.close()
    print(json.dumps(measured, indent=1), file=sys.stderr)
    assert not errors, "\n".join(errors)
    return measured


def _open_builder(server: dict, page, path: str):  # noqa: ANN001, ANN202
    """Open the notebook, Run All, and wait for the builder with its first estimate and Ready."""
    page.goto(f"{server['base']}{path}?token={server['token']}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    deadline = time.monotonic() + 60
    while not _kernel_idle(server):
        assert time.monotonic() < deadline, "the kernel did not start"
        time.sleep(0.3)
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")  # the Run menu (Lab and Notebook 7 alike)
    page.click('[data-command="runmenu:run-all"]')
    builder = page.wait_for_selector(".nbtune-builder", timeout=90_000)
    for selector in (".widget-dropdown", ".widget-text", ".widget-button", ".widget-html", ".widget-tab"):
        assert page.query_selector(selector) is not None, f"{selector} did not render"
    page.wait_for_selector(".nbtune-memory-bar", timeout=90_000)  # the memory panel's first estimate
    page.wait_for_selector(".nbtune-ready", timeout=90_000)
    assert "fits on" in builder.inner_text()
    assert not page.query_selector(".nbtune-static-builder:visible"), "the static copy shows beside the live form"
    return builder


def _run_stop_resume(page, measured: dict, shoot) -> None:  # noqa: ANN001
    """Launch, watch the states and the chart, measure the page's latency, Stop, Resume, Stop."""
    page.evaluate(WATCH_STATES)
    page.click(".nbtune-builder button:has-text('Launch')")
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    first = _points_grow(page, 2)
    _frame_latency(page, FRAME_WINDOW_S, measured)
    grown = _points_grow(page, first + 1)
    states = page.evaluate("() => window.__nbtuneStates")
    measured["states"] = [s.split(" — ")[-1][:40] for s in states]
    assert not any("Waiting for the previous run" in s for s in states), states
    training = next(i for i, s in enumerate(states) if "Training" in s)
    # what the badge showed before training are the run's phases (a slow page may show it first at training)
    from nbtune.widgets.progress import PHASE_WORDS, STATE_WORDS

    before = [w.rstrip("…") for w in (*PHASE_WORDS.values(), STATE_WORDS["starting"])]
    assert all(any(w in s for w in before) for s in states[:training]), states
    _shoot_dashboard(page, shoot, "live")

    clicked = time.monotonic()
    page.click("button:has-text('Stop')")
    page.wait_for_selector(".nbtune-status:has-text('Stopped on request')", timeout=90_000)
    measured["stop_click_to_stopped_s"] = round(time.monotonic() - clicked, 3)
    stopped = _step(page)
    page.wait_for_timeout(600)
    _shoot_dashboard(page, shoot, "stopped")
    assert _points(page) >= grown

    page.click("button:has-text('Resume')")
    deadline = time.monotonic() + 90
    while _step(page) <= stopped or "Training" not in page.inner_text(".nbtune-status"):
        assert time.monotonic() < deadline, f"Resume did not continue from step {stopped}"
        time.sleep(0.25)
    _shoot_dashboard(page, shoot, "resumed")
    page.click("button:has-text('Stop')")
    page.wait_for_selector(".nbtune-status:has-text('Stopped on request')", timeout=90_000)
    measured["steps"] = [stopped, _step(page)]
    assert measured["steps"][1] > stopped
    # The frame gaps while training are recorded (bench/results/browser-*.md), not bound here: p95 50-67 ms on the
    # Intel VM of browser-2026-12-01.md, 217-233 ms (median frame 17-67 ms, up to 39 gaps over 3x the median in
    # 6 s in Notebook 7) on the AMD VM of 2026-12-02, where the cause was not found. A speed target belongs in a
    # benchmark measured side by side, not in a timed test.


def test_builder_states_live_chart_stop_and_resume_in_jupyterlab(lab: dict):
    _record(_drive(lab, "/lab/tree/builder.ipynb", {
        "builder": "builder.png", "too-big": "not-ready-too-big.png", "offline": "not-ready-offline.png",
        "live": "live.png", "stopped": "stopped.png", "resumed": "resumed.png",
        "last-page": "last-page.png", "last-outputs": "last-outputs.txt"}), "jupyterlab")


# Notebook 7.6.5's own shortcuts plugin throws this on every page load (its /tree page too, with every lab
# extension disabled): a settings-registry handler reads `.schema` of a plugin it has no entry for.
NOTEBOOK7_KNOWN = (("Cannot read properties of undefined (reading 'schema')", "/static/notebook/notebook_core."),)


def test_builder_states_live_chart_stop_and_resume_in_notebook7(notebook7: dict):
    _record(_drive(notebook7, "/notebooks/builder.ipynb", {
        "stopped": "notebook7.png",
        "last-page": "notebook7-last-page.png", "last-outputs": "notebook7-last-outputs.txt"}, NOTEBOOK7_KNOWN),
        "notebook7")


def _record(measured: dict, app: str) -> None:
    """Keep what the browser measured beside the screenshots (bench/results copies it with the CPU model)."""
    (SHOTS / f"{app}-measured.json").write_text(json.dumps(measured, indent=1))


@contextlib.contextmanager
def _chromium_page(errors: list[str]):  # noqa: ANN202
    """A page of a headless chromium (1300x1500) whose console errors and page errors land in `errors`."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1300, "height": 1500})
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page: {e}"))
        try:
            yield page
        finally:
            browser.close()


def test_an_image_classifier_previews_its_images_and_charts_accuracy_to_the_end_in_jupyterlab(image_lab: dict):
    """The image task in a real browser: the builder is Ready with an estimate, "Preview data" shows the images
    with their labels, and the launched run's dashboard charts the loss and the held-out accuracy to Finished."""
    errors: list[str] = []
    with _chromium_page(errors) as page:
        builder = _open_builder(image_lab, page, "/lab/tree/builder.ipynb")
        _show_tab(page, "Data")
        page.click(".nbtune-builder button:has-text('Preview data')")
        page.wait_for_selector(".nbtune-builder img[src^='data:image/png']", timeout=60_000)
        shown = builder.inner_text()
        assert "Format image" in shown and "per label:" in shown, shown[-600:]
        assert page.locator(".nbtune-builder img[src^='data:image/png']").count() == 5
        builder.screenshot(path=str(SHOTS / "image-builder.png"))
        page.click(".nbtune-builder button:has-text('Launch')")
        page.wait_for_selector(".js-plotly-plot", timeout=90_000)
        page.wait_for_selector(".nbtune-status:has-text('Finished')", timeout=240_000)
        traces = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                               ".flatMap(p => (p.data || []).map(t => t.name))")
        assert "train loss" in traces and any("accuracy" in (name or "") for name in traces), traces
        _shoot_dashboard(page, lambda stage, target: target.screenshot(path=str(SHOTS / "image-finished.png")),
                         "finished")
    assert not errors, "\n".join(errors)


# What the builder and the dashboard show of the captioner's run, read from the page.
FIELD_VALUE = "name => document.querySelector(`.nbtune-field-${name} input`)?.value"
EXACT_MATCH = """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => ({
    titles: ((p.layout || {}).annotations || []).map(a => a.text),
    exact: ((p.data || []).find(t => t.name === 'eval accuracy') || {}).y || [],
    loss: ((p.data || []).find(t => t.name === 'train loss') || {}).y || [],
}))"""


def test_an_image_captioner_chosen_on_the_task_tab_previews_captions_and_charts_exact_match_in_jupyterlab(
        caption_lab: dict):
    """Image-to-text in a real browser: choosing the task on the Task tab swaps in the embedded captioner and its
    captions, the builder is Ready with the captioner's estimate, "Preview data" shows the images with their
    captions, and the launched run's dashboard charts the held-out exact match, from 0 to about 1, to Finished."""
    import re

    errors: list[str] = []
    with _chromium_page(errors) as page:
        builder = _open_builder(caption_lab, page, "/lab/tree/builder.ipynb")  # the text default, Ready
        # Ready is said once the captioner's own estimate has landed: the memory panel shows that estimate
        _choose_task(page, builder, "image-to-text", "nbtune:tiny-captioner", "nbtune:shape-captions")

        _show_tab(page, "Data")
        page.click(".nbtune-builder button:has-text('Preview data')")
        page.wait_for_selector(".nbtune-builder img[src^='data:image/png']", timeout=60_000)
        shown = builder.inner_text()
        assert "Format image" in shown and "640 training rows" in shown, shown[-800:]
        assert page.locator(".nbtune-builder th:text-is('caption')").count() == 1
        captions = re.findall(r"a \w+ (?:circle|cross|diamond|square|triangle) in the (?:top|bottom) "
                              r"(?:left|right)", shown)
        assert page.locator(".nbtune-builder img[src^='data:image/png']").count() == len(captions) == 5, shown
        builder.screenshot(path=str(SHOTS / "caption-builder.png"))

        page.click(".nbtune-builder button:has-text('Launch')")
        page.wait_for_selector(".js-plotly-plot", timeout=90_000)
        page.wait_for_selector(".nbtune-status:has-text('Finished')", timeout=240_000)
        page.wait_for_timeout(600)  # the live chart may just be giving way to the record
        plots = [plot for plot in page.evaluate(EXACT_MATCH) if plot["exact"]]
        assert plots, page.evaluate(EXACT_MATCH)
        chart = plots[-1]
        assert "<b>Held-out exact match of greedy captions</b>" in chart["titles"], chart["titles"]
        # evaluations at steps 0, 100, 200, 300: the base matches no held-out caption, the run nearly all
        assert len(chart["exact"]) >= 3 and chart["exact"][0] <= 0.05 and chart["exact"][-1] >= 0.9, chart
        assert chart["loss"], chart
        _shoot_dashboard(page, lambda stage, target: target.screenshot(path=str(SHOTS / "caption-finished.png")),
                         "finished")
    assert not errors, "\n".join(errors)


def _choose_task(page, builder, task: str, model: str, source: str) -> None:  # noqa: ANN001
    """Choose `task` on the Task tab; the builder swaps in its built-in model and data and is Ready with that
    model's own estimate."""
    _show_tab(page, "Task")
    page.select_option(".nbtune-field-model-task select", label=task)
    page.wait_for_function(f"() => ({FIELD_VALUE})('model-name-or-path') === '{model}'", timeout=30_000)
    assert page.evaluate(FIELD_VALUE, "data-source") == source
    assert f"switched to the built-in {model} on {source}" in builder.inner_text()
    page.wait_for_selector(f".nbtune-ready:has-text('{model}')", timeout=90_000)
    shown = builder.inner_text()
    assert "No estimate" not in shown and "fits on" in shown, shown[-800:]


DRAWN = "() => [...document.querySelectorAll('.nbtune-samples tr')].map(r => r.querySelectorAll('img').length)"


def test_a_diffusion_model_chosen_on_the_task_tab_previews_its_prompts_and_shows_what_it_draws_in_jupyterlab(
        draw_lab: dict):
    """Text-to-image in a real browser: choosing the task swaps in the tiny pipeline and the DreamBooth concept,
    the builder is Ready with the pipeline's estimate, "Preview data" shows the concept images with their
    prompts, and the launched run's dashboard charts the judged share and shows what each evaluation drew, to
    Finished."""
    errors: list[str] = []
    with _chromium_page(errors) as page:
        builder = _open_builder(draw_lab, page, "/lab/tree/builder.ipynb")
        _choose_task(page, builder, "text-to-image", "nbtune:tiny-diffusion", "nbtune:sks-star")
        _show_tab(page, "Data")
        page.click(".nbtune-builder button:has-text('Preview data')")
        page.wait_for_selector(".nbtune-builder img[src^='data:image/png']", timeout=60_000)
        shown = builder.inner_text()
        assert "24 training rows" in shown and shown.count("sks in the") == 5, shown[-800:]
        builder.screenshot(path=str(SHOTS / "draw-builder.png"))

        page.click(".nbtune-builder button:has-text('Launch')")
        page.wait_for_selector(".js-plotly-plot", timeout=90_000)
        page.wait_for_selector(".nbtune-status:has-text('Finished')", timeout=240_000)
        page.wait_for_timeout(600)
        chart = [plot for plot in page.evaluate(EXACT_MATCH) if plot["exact"]][-1]
        assert any("concept recognition" in t for t in chart["titles"]), chart["titles"]
        assert len(chart["exact"]) == 3 and all(0 <= a <= 1 for a in chart["exact"]) and chart["loss"], chart
        # the prompts' row, then the first 4 images each evaluation drew (steps 0, 20, 40)
        assert page.evaluate(DRAWN) == [0, 4, 4, 4], page.evaluate(DRAWN)
        _shoot_dashboard(page, lambda stage, target: target.screenshot(path=str(SHOTS / "draw-finished.png")),
                         "finished")
    assert not errors, "\n".join(errors)
