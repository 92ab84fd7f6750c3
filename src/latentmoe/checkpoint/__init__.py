"""Checkpoints: the HF format every command reads (`hf`), the one atomic commit of a run's
checkpoint directories (`commit`), whether a checkpoint is whole (`integrity`), hub model ids as local
directories (`hub`), and trainer checkpoints on one process or many (`training`)."""

from .hf import (CheckpointError, checkpoint_entries, default_dtype, fill_from_checkpoint, is_fp8_checkpoint,
                 load_model, read_fp8_weights, resolve_dtype, save_fp8_model, save_model)
from .hub import resolve_checkpoint

__all__ = ["load_model", "save_model", "fill_from_checkpoint", "CheckpointError", "checkpoint_entries", "resolve_dtype",
           "default_dtype", "resolve_checkpoint", "read_fp8_weights", "save_fp8_model", "is_fp8_checkpoint"]
