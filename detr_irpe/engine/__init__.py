"""Training, evaluation and checkpoint plumbing around the models in :mod:`detr_irpe.models`."""
from .checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint_file,
    load_for_finetuning,
    load_model_weights,
    state_dict_from_checkpoint,
)

__all__ = [
    "CheckpointError", "LoadReport", "load_checkpoint_file", "load_for_finetuning", "load_model_weights",
    "state_dict_from_checkpoint",
]
