"""One exception type for problems the user can fix.

The CLI prints its message on one line and exits with status 2, so every message must name the file
(or option) at fault and say what to do about it.
"""


class IkdmilError(Exception):
    """A user-fixable problem: bad input file, missing folder, incompatible checkpoint, ..."""
