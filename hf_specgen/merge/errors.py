"""The one exception of merging: its message names the problem (key, file, value)."""


class MergeError(ValueError):
    """Bad input to a merge: nothing has been written when it is raised."""
