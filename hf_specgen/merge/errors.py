"""The exceptions of merging: their messages name the problem (path, key, value)."""

from ..atomic import AtomicWriteError


class MergeError(ValueError):
    """Bad input to a merge: nothing has been written when it is raised."""


class MergeWriteError(AtomicWriteError):
    """Writing the merge's output failed (disk full, read-only file system, permissions): nothing was left
    behind, and an output it was to replace is intact. Its message starts with the output path."""


class MergeWarning(UserWarning):
    """Something a merge did that may not be what was meant (e.g. an adapter on another base model)."""


class PushError(RuntimeError):
    """The upload failed; the local output is intact."""
