"""The course's tools: benchmarks, grading, the dataset builders and the lesson timings.

Not what a learner imports: lessons and exercises use ``course_utils``. This package imports
``course_utils``; ``course_utils`` never imports it (tests/repo/test_import_graph.py).

- ``bench``     ``make bench``: training speed, MFU and memory, the loss alone, scoring, the estimator
- ``train``     every method in one call through SFTTrainer with the course's kernels (the bench's path)
- ``grading``   nbgrader: the exercises from their masters, a batch of submissions graded
- ``datasets``  writes the data files the package ships (``python -m course_tools.datasets``)
- ``timings``   each lesson's measured wall time (``make timings``)
- ``lab``       ``make course``: JupyterLab's learner view (``--instructor``: every file)
- ``my_work``   the learner's exercise folder, ``my-work/``, copied once from ``exercises/``
"""

import course_utils  # noqa: F401  (first: its env module quiets bitsandbytes' install advice)
