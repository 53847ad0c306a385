"""Real JupyterLab in real (headless) Chromium: the harness behind the widget tests.

nbval runs no JavaScript, so a widget is only tested for real in a browser. These helpers start
JupyterLab on 127.0.0.1 (no token, no news, no update check, read-only extension manager), drive
Debian's chromium with Playwright (never `playwright install`: nothing can be downloaded here),
open a notebook through ``window.jupyterapp``, run all its cells, move sliders with the keyboard
and read what the widgets display.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUIET_LAB = {  # no news feed, no update check (the machine is offline), never save the notebook
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    # Render every cell: with windowing, cells out of view have no text to read.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(workdir: Path) -> Iterator[str]:
    """Run JupyterLab over the repository for the duration of the block; yield its base URL."""
    settings = workdir / "settings"
    for name, value in QUIET_LAB.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    port = free_port()
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        f"--ServerApp.root_dir={ROOT}", "--ServerApp.token=", "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True", "--allow-root",
        "--LabApp.news_url=None", "--LabApp.expose_app_in_browser=True",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workdir / 'ws'}",
    ]  # fmt: skip
    environment = os.environ | {
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
        "COURSE_PROFILE": os.environ.get("COURSE_PROFILE", "ci"),  # kernels inherit it
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    log = open(workdir / "lab.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (workdir / "lab.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not start in 120 s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@contextlib.contextmanager
def chromium_page() -> Iterator[object]:
    """Yield a Playwright page in headless Debian chromium (closed afterwards)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            yield page
        finally:
            browser.close()


def open_notebook(page, base_url: str, relative_path: str) -> None:
    """Load JupyterLab, wait until it is restored, and open a notebook with a ready kernel."""
    page.goto(f"{base_url}/lab", wait_until="domcontentloaded")
    page.wait_for_function("window.jupyterapp !== undefined", timeout=120_000)
    page.evaluate(
        """async (path) => {
            const app = window.jupyterapp;
            await app.restored;
            await app.serviceManager.kernelspecs.ready;
            const panel = await app.commands.execute('docmanager:open',
                                                     {path: path, factory: 'Notebook'});
            await panel.context.ready;
            await panel.sessionContext.ready;
            app.shell.activateById(panel.id);
        }""",
        relative_path,
    )
    page.wait_for_function(
        """() => {
            const panel = window.jupyterapp.shell.currentWidget;
            const kernel = panel && panel.sessionContext.session
                && panel.sessionContext.session.kernel;
            return kernel && kernel.status === 'idle';
        }""",
        timeout=120_000,
    )


def run_all_cells(page, timeout_s: float = 900) -> None:
    """Run every cell of the open notebook and wait until the kernel is done; fail on an error."""
    page.evaluate(
        "() => { window.__courseRun = window.jupyterapp.commands"
        ".execute('notebook:run-all-cells').then(ok => (window.__courseDone = ok)); }"
    )
    page.wait_for_function("window.__courseDone !== undefined", timeout=timeout_s * 1000)
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
        " === 'idle'",
        timeout=timeout_s * 1000,
    )
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t[:200]]
    assert page.evaluate("window.__courseDone") is True, "a cell failed:\n" + "\n".join(tracebacks)


def slider(page, description: str, index: int = 0):
    """Return the `index`-th slider widget (in page order) whose label reads `description`."""
    widget = page.locator(
        ".widget-slider", has=page.locator(".widget-label", has_text=description)
    ).nth(index)
    widget.wait_for(state="visible", timeout=60_000)
    return widget


def press_slider(page, description: str, key: str, times: int = 1, index: int = 0) -> None:
    """Focus a slider's handle and press `key` (ArrowRight, ArrowLeft, ...) `times` times."""
    handle = slider(page, description, index).locator(".noUi-handle")
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(times):
        handle.press(key)


def slider_value(page, description: str, index: int = 0) -> str:
    """Return the value a slider shows in its readout."""
    return slider(page, description, index).locator(".widget-readout").inner_text().strip()


def kernel_print(page, code: str, timeout_s: float = 120) -> str:
    """Run `code` in the open notebook's kernel (not as a cell) and return what it printed."""
    return page.evaluate(
        """async (code) => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            let printed = '';
            const future = kernel.requestExecute({code: code, store_history: false});
            future.onIOPub = (msg) => {
                if (msg.header.msg_type === 'stream') { printed += msg.content.text; }
                if (msg.header.msg_type === 'error') { printed += msg.content.evalue; }
            };
            await future.done;
            return printed;
        }""",
        code,
    ).strip()


def widget_text(page, css_class: str, expected: str | None = None, timeout_s: float = 60) -> str:
    """Return the text of the widget with `css_class`, once it equals `expected` if given."""
    locator = page.locator(f".{css_class}").first
    locator.wait_for(state="visible", timeout=timeout_s * 1000)
    locator.scroll_into_view_if_needed()
    deadline = time.monotonic() + timeout_s
    text = locator.inner_text().strip()
    while expected is not None and text != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        text = locator.inner_text().strip()
    return text


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot under outputs/test-artifacts/ and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
