"""UI-format workflow -> API-format prompt: the headless runner's converter (scripts/run_workflow.py), shared so the
tests and the runner convert the same way (and tests/test_examples.py checks it against the frontend's own)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))

from run_workflow import ui_to_api  # noqa: E402,F401
