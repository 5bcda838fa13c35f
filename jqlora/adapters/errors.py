"""The adapters wing's errors: one line each, naming the adapter directory or export target and what is wrong."""


class AdapterError(ValueError):
    """An adapter directory that cannot be read into (or written from) this model; the message says where and why."""


class ExportError(ValueError):
    """A problem with what is being exported or where; the message names the file or directory."""
