"""Every lesson survives "Restart kernel and run all" a second time.

nbval (in the same `make test`) runs each notebook once; this runs it again from a fresh kernel
in the same folder, so a notebook that leaves files or state behind that break a second run fails.
"""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
LESSONS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# A second run finds what the first left behind. Lesson 05 writes runs/05_lora_lab (a trainer's
# checkpoints, adapters, a merged model) and runs again here. 06-08, 10 and 12-14 clean their
# runs/ folder the way 05 does (10 writes no files); each trains two to eight models, so running
# them a second time would push `make test` past its 20-minute budget. Lessons 00-04 write files
# only into temporary folders (test_the_lessons_run_once_write_no_files checks their code), so a
# second run would repeat the first one: same folder, same caches, a fresh kernel.
RUN_AGAIN = {"05_lora_lab.ipynb"}
NOTEBOOKS = [p for p in LESSONS if p.name in RUN_AGAIN]
#: Calls that leave a file behind, unless the cell works in a temporary folder (tempfile).
WRITES = re.compile(
    r"save_pretrained\(|output_dir=|\.write_(text|bytes)\(|open\([^)]*[\"'][wax]b?[\"']|"
    r"savefig\(|\.to_json\(|\.to_csv\(|mkdir\(|torch\.save\(|save_file\(|save_to_disk\("
)


def test_the_lessons_run_once_write_no_files():
    """00-04 run once, so none may write a file outside a temporary folder (see RUN_AGAIN)."""
    for path in LESSONS[:5]:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code" and "tempfile." not in cell.source:
                assert not WRITES.search(cell.source), (path.name, cell.source[:300])


def test_the_file_write_check_sees_a_write():
    for line in ('model.save_pretrained("out")', 'open("x.json", "w")', "Path(p).write_text(s)"):
        assert WRITES.search(line), line
    assert not WRITES.search('open("x.json")')


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_again_from_a_fresh_kernel(path, monkeypatch, notebook_lock):
    monkeypatch.setenv("COURSE_PROFILE", "ci")
    before = path.read_bytes()
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    )
    with notebook_lock(path):  # not while nbval runs the same lesson on the other worker
        client.execute()
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    assert path.read_bytes() == before, "running the notebook must not rewrite its own file"


TRY_LOCK = """
import fcntl, sys
sys.path.insert(0, sys.argv[1])
from conftest import lock_path
with open(lock_path(sys.argv[2]), "w") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
"""


def test_the_lesson_lock_keeps_the_other_worker_out(notebook_lock, tmp_path):
    """While one worker runs a lesson, the other cannot take the same lesson (another, it can)."""
    lesson, other = tmp_path / "05_lesson.ipynb", tmp_path / "06_lesson.ipynb"

    def other_worker_tries(path):
        command = [sys.executable, "-c", TRY_LOCK, str(ROOT), str(path)]
        return subprocess.run(command, timeout=60).returncode

    with notebook_lock(lesson):
        assert other_worker_tries(lesson) == 3
        assert other_worker_tries(other) == 0
    assert other_worker_tries(lesson) == 0
