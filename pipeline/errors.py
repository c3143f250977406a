"""One error type for user mistakes: the CLI prints its message on one line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad file, mismatched artefacts).

    The message should say what is wrong, where (file and line when known), and how to fix it.
    """
