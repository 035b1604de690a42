"""User-facing errors: the CLI prints these without a traceback and exits with status 2."""


class UserError(ValueError):
    """Bad input from the user (a file, a field, an option). The message names it and the accepted values."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message names the term, the step and the last good checkpoint."""


class InputWarning(UserWarning):
    """Something the user should know about an input or a result (a policy override, AP 0 from mismatched category
    ids...). The CLI prints it as ``PROG: warning: MESSAGE``; tests catch it with ``pytest.warns``."""
