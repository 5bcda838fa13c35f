"""The checkpoints wing's error: a bad checkpoint or conversion request is one `ConvertError` line naming the file
and key."""


class ConvertError(ValueError):
    """A problem with a checkpoint or a conversion request; the message names the file and key."""
