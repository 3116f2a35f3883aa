"""User-facing errors: one line, no traceback, a non-zero exit from the CLI."""


class FedtuneError(Exception):
    """A mistake in the user's input (config, data, model path), not a bug.

    The CLI prints ``error: <message>`` and exits with status 2. The message names
    what is wrong and what to do about it.
    """
