"""One exception type for every user-facing failure.

The CLI prints ``FisherJaxError`` messages as a single line (no traceback); anything else is a bug.
"""


class FisherJaxError(Exception):
    """A problem with the user's input (paths, shapes, statistics, tasks) explained in one line."""
