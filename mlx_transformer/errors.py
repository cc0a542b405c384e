"""Errors a user can cause. The CLI prints them as one line and exits non-zero; no traceback.

Framework-free so that `export/` raises the same kind of error.
"""


class UserError(Exception):
    """Bad input from the user (missing file, invalid config, wrong shapes...).

    The message says what is wrong and, where it can, what to do about it.
    """
