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
