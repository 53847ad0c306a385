"""`make course` serves JupyterLab headless: it prints a URL, and that URL answers with the lab."""

import os
import re
import signal
import subprocess
import time
import urllib.request

from browser import ROOT, free_port


def test_make_course_serves_jupyterlab(tmp_path):
    port = free_port()
    log = tmp_path / "lab.log"
    environment = os.environ | {"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "course", f"PORT={port}"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=environment,
            start_new_session=True,
        )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            assert process.poll() is None, f"make course exited early:\n{log.read_text()[-3000:]}"
            found = re.search(rf"http://127\.0\.0\.1:{port}/lab\S*", log.read_text())
            url = found.group(0) if found else None
            time.sleep(0.5)
        assert url, f"no JupyterLab URL printed:\n{log.read_text()[-3000:]}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
            assert "JupyterLab" in response.read().decode()
        notebook = url.replace("/lab?", "/lab/tree/notebooks/00_start_here.ipynb?")
        with urllib.request.urlopen(notebook, timeout=30) as response:
            assert response.status == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


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
