"""Tasks: classification and causal-lm behind one interface (`confide.tasks.base.Task`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confide.config import RunConfig
    from confide.tasks.base import Task

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)


def get_task(cfg: RunConfig) -> Task:
    """The task object of a run configuration (key `task`)."""
    name = getattr(cfg, "task", CLASSIFICATION)
    if name == CAUSAL_LM:
        from confide.tasks.causal_lm import CausalLmTask

        return CausalLmTask(cfg)
    if name == CLASSIFICATION:
        from confide.tasks.classification import ClassificationTask

        return ClassificationTask(cfg)
    raise ValueError(f"task = {name!r}; allowed: {', '.join(TASKS)}")
