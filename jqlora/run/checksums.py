"""Checksums of a checkpoint directory: `jqlora.checkpoints.checksums` (there, every writer of the run reaches it)."""

from jqlora.checkpoints.checksums import CHECKSUMS, verify_checkpoint, write_checksums

__all__ = ["CHECKSUMS", "verify_checkpoint", "write_checksums"]
