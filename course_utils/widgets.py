"""Interactive explorers for the theory lessons (ipywidgets).

Each widget is a thin layer over a plain function that computes the numbers it shows, so every
explorer also works without a browser: call the function, get the numbers.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# LoRA: rank explorer and alpha explorer (lesson 02)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Memory calculator (lesson 03)
# ---------------------------------------------------------------------------------------------
