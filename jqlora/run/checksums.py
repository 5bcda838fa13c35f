"""Checksums of a checkpoint directory (`jqlora.checkpoints.checksums`, where every writer of the run can reach them)."""

from jqlora.checkpoints.checksums import CHECKSUMS, verify_checkpoint, write_checksums

__all__ = ["CHECKSUMS", "verify_checkpoint", "write_checksums"]
