"""One exception type for everything a user can get wrong.

The CLI turns a UserError into one `fasttrain: error: ...` line on stderr and exit status 2, with no
traceback. Raise it for bad input (paths, flags, datasets, checkpoints); let real bugs raise normally.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


EXIT_USAGE = 2
EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell and torchrun expect from a preempted job
EXIT_SIGINT = 130  # 128 + SIGINT: Ctrl-C
