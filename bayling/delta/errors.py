"""The one exception the delta tools raise for bad input: its message is one line a user can act on."""


class DeltaError(ValueError):
    """Bad input or a failed write; nothing was left behind."""
