"""The data wing's error: every user mistake in a dataset is one `DataError` line naming the file and line (or row)."""


class DataError(ValueError):
    """A problem with the user's data, named by file and line (or row) where there is one."""
