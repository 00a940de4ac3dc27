"""One exception type for everything a user can get wrong.

The CLI turns a UserError into one `fasttrain: error: ...` line on stderr and exit status 2, with no
traceback. Raise it for bad input (paths, flags, datasets, checkpoints); let real bugs raise normally.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def check_counts(*checks: tuple) -> None:
    """(flag, value, least[, unit]) each: a UserError for the first value below its least, worded
    "--flag must be 0 or more, got V" or "--flag must be at least N[unit], got V". A value None (not given)
    passes."""
    for flag, value, least, *unit in checks:
        if value is not None and value < least:
            what = "0 or more" if least == 0 else f"at least {least}{''.join(unit)}"
            raise UserError(f"{flag} must be {what}, got {value}")


EXIT_USAGE = 2
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell and torchrun expect from a preempted job
EXIT_SIGINT = 130  # 128 + SIGINT: Ctrl-C
