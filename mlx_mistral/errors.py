"""The one exception type users see: the CLI prints its message as a single line."""


class MistralError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
