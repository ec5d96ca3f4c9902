"""Error types. `MmkitError` is a user-facing error: its message says what to fix, and the CLI prints it as one
line with exit code 2."""


class MmkitError(ValueError):
    """Bad input or an unsupported combination; the message tells the user what to change."""


class UnsupportedModelError(MmkitError):
    """The checkpoint's architecture is not one mmkit knows how to adapt."""
