"""Checkpoints: the HF format every command reads (`hf`), the one atomic commit of a run's
checkpoint directories (`commit`), whether a checkpoint is whole (`integrity`), and trainer checkpoints on
one process or many (`training`)."""

from .hf import (CheckpointError, checkpoint_entries, default_dtype, fill_from_checkpoint, load_model, resolve_dtype,
                 save_model)

__all__ = ["load_model", "save_model", "fill_from_checkpoint", "CheckpointError", "checkpoint_entries", "resolve_dtype",
           "default_dtype"]
