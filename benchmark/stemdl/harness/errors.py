"""The project's own error type.

Everything a user can cause (bad data, bad config, bad arguments) raises `StemdlError` with a one-line
message that names the file and the sample (or the config key). The CLI prints it and exits non-zero;
anything else escaping is a bug in stemdl.
"""


class StemdlError(Exception):
    """A user-facing error: one line, naming what is wrong and where."""


class DataError(StemdlError):
    """A data file or a sample in it is missing, unreadable or malformed."""

    def __init__(self, path, reason, group=None):
        self.path = str(path)
        self.group = group
        self.reason = reason
        shown = group if group is None or group.isprintable() else repr(group)  # one line, whatever the name
        where = f"{self.path}:{shown}" if group is not None else self.path
        super().__init__(f"{where}: {' '.join(str(reason).split())}")

    def __reduce__(self):
        # Rebuilt from its parts when a worker process sends it back to the parent.
        return (type(self), (self.path, self.reason, self.group))
