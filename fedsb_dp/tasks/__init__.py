"""Tasks: how records become batches, the per-example loss, and the held-out metrics."""

from fedsb_dp.models import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TASKS
from fedsb_dp.tasks.base import Task
from fedsb_dp.tasks.causal_lm import LM_FORMATS, CausalLMTask, label_prompt
from fedsb_dp.tasks.classification import ClassificationTask

__all__ = ["CAUSAL_LM", "LM_FORMATS", "SEQUENCE_CLASSIFICATION", "TASKS", "CausalLMTask",
           "ClassificationTask", "Task", "label_prompt"]
