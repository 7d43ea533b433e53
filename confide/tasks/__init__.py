"""Tasks: classification and causal-lm behind one interface (`confide.tasks.base.Task`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from confide.config import RunConfig
    from confide.model import ModelSpec
    from confide.tasks.base import Task

CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)


def task_class(name: str) -> type[Task]:
    """The task class of a task name (a run configuration's or a model spec's `task`)."""
    if name == CAUSAL_LM:
        from confide.tasks.causal_lm import CausalLmTask

        return CausalLmTask
    if name == CLASSIFICATION:
        from confide.tasks.classification import ClassificationTask

        return ClassificationTask
    raise ValueError(f"task = {name!r}; allowed: {', '.join(TASKS)}")


def get_task(cfg: RunConfig) -> Task:
    """The task object of a run configuration (key `task`)."""
    return task_class(getattr(cfg, "task", CLASSIFICATION))(cfg)


def build_model(spec: ModelSpec) -> nn.Module:
    """The model of `spec`'s task, with exactly the spec's parameters trainable, seeded so
    that every node builds the same one."""
    return task_class(spec.task).build_model(spec)


def count_trainable_parameters(spec: ModelSpec) -> int:
    """How many parameters `build_model(spec)` trains, without reading any weights (the
    model is assembled on the meta device from its configuration)."""
    return task_class(spec.task).count_trainable_parameters(spec)
