"""`make course` serves the learner's JupyterLab: lesson 00 first, answers out of sight, no pop-up.

Driven in headless chromium as a learner meets it: the URL `make course` prints opens lesson 00;
the file browser lists the lessons and my-work/ but not solutions/, tests/ or bench/; no news
pop-up; no nbgrader menu. `make course INSTRUCTOR=1` lists every folder and has nbgrader's menu.
"""

import contextlib
import os
import re
import signal
import subprocess
import time

import pytest
from browser import ROOT, chromium_page, free_port

NEWS = "official Jupyter news"  # the pop-up JupyterLab shows when nobody has turned it off


@contextlib.contextmanager
def make_course(tmp_path, *make_args):
    """Run `make course` on a free port with a fresh Jupyter state; yield the URL it prints."""
    port = free_port()
    log = tmp_path / "lab.log"
    environment = os.environ | {
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "course", f"PORT={port}", *make_args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environment,
            start_new_session=True,
        )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            assert process.poll() is None, f"make course exited early:\n{log.read_text()[-3000:]}"
            found = re.search(rf"http://127\.0\.0\.1:{port}/\S+", log.read_text())
            url = found.group(0) if found else None
            time.sleep(0.5)
        assert url, f"no JupyterLab URL printed:\n{log.read_text()[-3000:]}"
        yield url, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _root_listing(page) -> set[str]:
    """The names the file browser lists at the repository root."""
    page.locator(".jp-BreadCrumbs-home").first.click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-DirListing-itemName')]"
        ".some(e => e.textContent.trim() === 'notebooks')",
        timeout=60_000,
    )
    return {n.strip() for n in page.locator(".jp-DirListing-itemName").all_inner_texts()}


def _menus(page) -> set[str]:
    """The labels of the main menu bar."""
    return {m.strip() for m in page.locator(".lm-MenuBar-itemLabel").all_inner_texts()}


def _open_lab(page, url: str) -> None:
    """Load the printed URL and wait for the notebook it opens to show its first cell."""
    page.goto(url, wait_until="domcontentloaded")
    page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(state="visible", timeout=120_000)
    time.sleep(5)  # JupyterLab asks about news a moment after it is ready: give it the time


def test_the_learner_lands_on_lesson_00_and_sees_no_answers(tmp_path):
    with make_course(tmp_path) as (url, log), chromium_page() as page:
        assert "/lab/tree/notebooks/00_start_here.ipynb?token=" in url
        _open_lab(page, url)
        tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current").first
        assert "00_start_here.ipynb" in tab.inner_text(), page.title()
        listing = _root_listing(page)
        assert {"notebooks", "my-work", "README.md"} <= listing, listing
        assert not listing & {"solutions", "tests", "bench", "exercises", "course_tools"}, listing
        assert NEWS not in page.content()
        assert "Nbgrader" not in _menus(page)
        assert "my-work/" in log.read_text()
    assert (ROOT / "my-work" / "02_lora_math" / "02_lora_math_exercises.ipynb").is_file()


def test_the_instructor_view_lists_everything(tmp_path):
    with make_course(tmp_path, "INSTRUCTOR=1") as (url, _), chromium_page() as page:
        _open_lab(page, url)
        listing = _root_listing(page)
        assert {"solutions", "tests", "bench", "exercises", "notebooks"} <= listing, listing
        assert NEWS not in page.content()
        assert "Nbgrader" in _menus(page)


@pytest.mark.parametrize("instructor", [False, True])
def test_the_lab_command_line(instructor, tmp_path):
    """The learner's command hides the answers and nbgrader's server side; the instructor's does not."""
    from course_tools import lab

    command = lab.lab_command(instructor, "127.0.0.1", 1234, tmp_path, ["--allow-root"])
    assert "--LabApp.default_url=/lab/tree/notebooks/00_start_here.ipynb" in command
    assert "--LabApp.news_url=None" in command and command[-1] == "--allow-root"
    hides = "--ContentsManager.hide_globs=solutions" in command
    nbgrader_off = "--ServerApp.jpserver_extensions=nbgrader.server_extensions.formgrader=False"
    assert hides is (not instructor) and (nbgrader_off in command) is (not instructor)
    settings = lab.write_settings(tmp_path / "settings", instructor)
    page_config = (settings / "page_config.json").read_text()
    assert ("@jupyter/nbgrader" in page_config) is (not instructor)
    assert '"fetchNews": "false"' in (settings / "overrides.json").read_text()


def test_a_cpu_only_torch_index_is_used_before_the_pinned_requirements(tmp_path):
    """`make course TORCH_INDEX=...` installs the pinned torch from that index first (a dry run)."""
    index = "https://download.pytorch.org/whl/cpu"
    venv = tmp_path / "venv"  # a venv that does not exist: make plans the whole set-up
    plan = subprocess.run(
        ["make", "-n", "--no-print-directory", "setup", f"VENV={venv}", f"TORCH_INDEX={index}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    lines = plan.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if f"--index-url {index}" in line)
    assert f"torch=={pin}" in lines[torch_line]
    requirements = next(i for i, line in enumerate(lines) if "-r requirements.txt" in line)
    assert torch_line < requirements
    default = subprocess.run(
        ["make", "-n", "--no-print-directory", "setup", f"VENV={venv}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--index-url" not in default
