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


def build_model(spec: ModelSpec) -> nn.Module:
    """The model of `spec`'s task, with exactly the spec's parameters trainable, seeded so
    that every node builds the same one."""
    if spec.task == CAUSAL_LM:
        from confide.tasks.causal_lm import build_causal_lm

        return build_causal_lm(spec)
    if spec.task == CLASSIFICATION:
        from confide.model import build_classifier

        return build_classifier(spec)
    raise ValueError(f"task = {spec.task!r}; allowed: {', '.join(TASKS)}")
