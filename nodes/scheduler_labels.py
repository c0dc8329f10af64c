"""The scheduler widget: the labels a saved workflow holds, and the core's scheduler ids they stand for."""
from __future__ import annotations

from ..pixart_core import schedulers

# id -> label, in the widget's order. The labels are what saved workflows hold: never change one.
LABELS: dict[str, str] = {
    "dpmpp_2m": "dpm++ 2m",
    "sa_solver": "sa-solver",
    "ddim": "ddim",
    "euler": "euler",
    "euler_ancestral": "euler ancestral",
    "unipc": "unipc",
    "ddpm": "ddpm",
    "lcm": "lcm",
    "dmd": "dmd 1-step (t=400)",
}
IDS: dict[str, str] = {label: scheduler_id for scheduler_id, label in LABELS.items()}
DEFAULT = LABELS[schedulers.DEFAULT]
assert set(LABELS) == set(schedulers.SCHEDULERS), "every scheduler of the core's table needs a label"


def options(one_step: bool = True) -> list[str]:
    """The widget's options (without the one-step DMD scheduler for nodes that only do img2img)."""
    return [label for scheduler_id, label in LABELS.items() if one_step or scheduler_id != schedulers.DMD]


def to_id(label: str) -> str:
    """The core's scheduler id for a widget label."""
    if label not in IDS:
        raise ValueError(f"Unknown scheduler {label!r}; choose one of {list(IDS)}.")
    return IDS[label]
