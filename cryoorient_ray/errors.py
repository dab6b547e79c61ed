"""The project's one domain exception.

:class:`CryoOrientError` marks bad *input* (a config key that does not exist, an unknown
symmetry group, an array of the wrong shape). The CLI turns it into one red error line and
exit code 1. It subclasses :class:`ValueError`, so library users can catch it as such.
"""


class CryoOrientError(ValueError):
    """Bad input: reported to the user as one line, never as a traceback."""
