"""Graded exercises with nbgrader, split by job (``python -m course_tools.grading``, see __main__):

- ``config``    where the masters and exercises are, the limits, nbgrader's settings in code
- ``generate``  ``solutions/`` -> ``exercises/`` and the checks that they agree (``make exercises``)
- ``sandbox``   what keeps one student's code away from the others and from the instructor's files
- ``batch``     a folder of submissions graded into grades.csv and feedback (``make grade``)
"""

from .batch import GradeRow, grade_submissions, repair_submission
from .config import CSV_FIELDS, Exercise, list_exercises
from .generate import check_exercises, generate_exercises, normalise_notebook, validate_notebook
from .sandbox import install_sandbox

__all__ = [
    "CSV_FIELDS",
    "Exercise",
    "GradeRow",
    "check_exercises",
    "generate_exercises",
    "grade_submissions",
    "install_sandbox",
    "list_exercises",
    "normalise_notebook",
    "repair_submission",
    "validate_notebook",
]
