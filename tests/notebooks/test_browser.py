"""The notebooks as a reader sees them: JupyterLab in a real browser (Debian's chromium, driven by Playwright).

JupyterLab runs on 127.0.0.1 (a free port, a token, its own settings and workspace folders) over copies of
notebooks 04 and 01 whose parameters are made small the way papermill does it (an injected cell after the
``parameters`` cell). For each: Run All Cells from the Run menu, then check that no cell shows an error,
that every static figure is an image drawn at twice its displayed size, that the explorer's widgets
rendered, and that changing a dropdown (04) or a slider (01) redraws the explorer's image.

The browser is the system's ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs
it when missing); nothing is downloaded. Without it the test is skipped on a workstation and fails in CI
(``CI=true``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# small parameters (those of the papermill tests), so each notebook runs in well under a minute
NOTEBOOKS = {
    "04_curvature_explorer": {
        "n_layers": 1,
        "seq_len": 8,
        "corpus_bytes": 100_000,
        "train_batch": 8,
        "curvature_batch": 2,
        "checkpoints": [0, 20],
        "top_k": 3,
        "slq_probes": 2,
        "slq_iter": 10,
        "operator_batch": 1,
        "operator_iter": 5,
    },
    "01_gauss_newton_from_scratch": {
        "steps": 8,
        "grid_points": 25,
        "n_train": 128,
        "outer_steps": 4,
        "inner_steps": 4,
        "dampings": [0.0, 10.0],
    },
}
RUN_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_parameters(notebook: nbformat.NotebookNode, parameters: dict) -> nbformat.NotebookNode:
    """``notebook`` with a cell assigning ``parameters`` after its ``parameters`` cell, as papermill injects it."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, injected)
    return notebook


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A JupyterLab server over small-parameter copies of the notebooks: (base URL with token, its folder)."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium), as .ci/run does"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    home = tmp_path_factory.mktemp("lab")
    work = home / "notebooks"
    work.mkdir()
    for name, parameters in NOTEBOOKS.items():
        notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        parameters = {**parameters, "output_dir": str(home / "outputs" / name)}
        nbformat.write(with_parameters(notebook, parameters), work / f"{name}.ipynb")
    settings = home / "settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"windowingMode": "none"}')  # every cell in the page, scrolled into view or not
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about news?" toast over the page
    token, port = secrets.token_hex(16), free_port()
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={work}",
        "--ServerApp.port_retries=0",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = (home / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(home / 'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        # one workspace per notebook, so a page does not reopen the notebooks of the one before
        yield f"{base}/lab/workspaces/{{name}}/tree/{{name}}.ipynb?reset&token={token}", home
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab) -> Iterator:
    """Chromium with a fresh profile, one page."""
    from playwright.sync_api import sync_playwright

    profile = lab[1] / "chromium-profile"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def run_all(page, url: str) -> None:
    """Open the notebook, wait for its kernel, Run All Cells from the Run menu and wait until every cell ran."""
    page.goto(url)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)  # the kernel has started
    code_cells = page.locator(".jp-Notebook .jp-CodeCell").count()
    started = "() => document.querySelector('.jp-Notebook .jp-CodeCell .jp-InputPrompt').textContent.trim() !== '[ ]:'"
    page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first.click()  # this notebook has the focus
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(started, timeout=30_000)
    done = (
        "n => { const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]"
        ".map(p => p.textContent.trim());"
        " return prompts.length === n && prompts.every(t => /^\\[\\d+\\]:$/.test(t)); }"
    )
    page.wait_for_function(done, arg=code_cells, timeout=RUN_TIMEOUT_S * 1000, polling=1000)
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=30_000)


def static_images(page) -> list[dict]:
    """Image outputs outside widgets: natural and displayed sizes, once loaded."""
    return page.eval_on_selector_all(
        ".jp-OutputArea .jp-RenderedImage img",
        "imgs => imgs.map(i => ({natural: i.naturalWidth, shown: i.getBoundingClientRect().width, done: i.complete}))",
    )


def widget_image_digest(page) -> str:
    """sha256 of the bytes behind the explorer's image (its blob URL)."""
    page.wait_for_function(
        "() => { const i = document.querySelector('.widget-image'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    data = page.evaluate(
        "async () => { const i = document.querySelector('.widget-image');"
        " const b = await (await fetch(i.src)).arrayBuffer(); return Array.from(new Uint8Array(b)); }"
    )
    assert bytes(data[:4]) == b"\x89PNG"
    return hashlib.sha256(bytes(data)).hexdigest()


def wait_for_new_image(page, before: str) -> str:
    deadline = time.monotonic() + 60
    while (after := widget_image_digest(page)) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    return after


def check_notebook(page, url: str, figures: int) -> None:
    """Run All, then: no error output, ``figures`` sharp static images, the explorer's widgets and image."""
    run_all(page, url)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, errors.first.inner_text()[:2000]
    assert page.get_by_text("<Figure size", exact=False).count() == 0
    page.wait_for_function(
        "n => { const imgs = [...document.querySelectorAll('.jp-OutputArea .jp-RenderedImage img')];"
        " return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=figures,
        timeout=30_000,
    )
    images = static_images(page)
    assert len(images) == figures
    for image in images:  # drawn at twice the displayed size: sharp, not upscaled
        assert image["natural"] == pytest.approx(2 * image["shown"], rel=0.02), image
    assert page.locator(".jupyter-widgets.widget-vbox").count() >= 1
    assert page.locator(".widget-image").count() == 1


def test_curvature_explorer_in_jupyterlab(lab, browser):
    page = browser.new_page()
    check_notebook(page, lab[0].format(name="04_curvature_explorer"), figures=7)
    dropdowns = page.locator(".widget-dropdown select")
    assert dropdowns.count() == 6  # checkpoint, matrix, partition, normalize, row block, col block
    assert page.locator(".widget-checkbox input").count() == 1
    before = widget_image_digest(page)
    matrix = page.locator(".widget-dropdown", has_text="matrix").locator("select")
    matrix.select_option(label="Hessian")
    assert wait_for_new_image(page, before) != before
    before = widget_image_digest(page)
    page.locator(".widget-dropdown", has_text="partition").locator("select").select_option(label="per tensor")
    assert wait_for_new_image(page, before) != before
    page.close()


def test_gauss_newton_from_scratch_in_jupyterlab(lab, browser):
    page = browser.new_page()
    check_notebook(page, lab[0].format(name="01_gauss_newton_from_scratch"), figures=4)
    sliders = page.locator(".widget-slider")
    assert sliders.count() == 2
    before = widget_image_digest(page)
    handle = page.locator(".widget-slider", has_text="step size").locator(".noUi-handle")
    handle.focus()
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    assert page.locator(".widget-slider", has_text="step size").locator(".widget-readout").inner_text() == "0.80"
    assert wait_for_new_image(page, before) != before
    page.close()
