"""Checkpoints: save/resume through DeepSpeed with completeness markers."""
