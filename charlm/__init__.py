"""charlm: character-level RNN language models with PyTorch Lightning and Hydra."""

import logging
import sys
from contextlib import contextmanager

__version__ = "0.2.0"


class UserError(Exception):
    """A mistake the user can fix (bad config, bad input file, bad checkpoint).

    Entry points print its message as one line and exit non-zero, without a traceback.
    The message is one sentence that names the fix.
    """

    exit_code = 2


class Diverged(UserError):
    """Training produced a non-finite loss or gradient; reported like a UserError, with exit code 3."""

    exit_code = 3


class Interrupted(UserError):
    """Ctrl+C stopped the command where it could not finish the step first; reported like a UserError, exit 130."""

    exit_code = 130


@contextmanager
def reported_user_errors(exit: bool = True, log: logging.Logger | None = None):
    """Turn a UserError (also one wrapped by Hydra's instantiate) into one line on stderr and its exit code.

    ``exit=False`` (a job of a sweep): print the line, then raise the UserError itself, which Hydra records as
    that job's failure (and Optuna as a failed trial) while the sweep goes on; a SystemExit would end it.
    ``log``: log the line as an error instead of printing it (charlm-train's logging shows it on stderr and
    writes it into the run's train.log); printed all the same where that logging shows nothing
    (``hydra/job_logging=disabled``)."""
    try:
        yield
    except Exception as e:
        cause = user_error_in(e)
        if cause is None:
            raise
        if log is None or not (log.isEnabledFor(logging.ERROR) and log.hasHandlers()):
            print(f"error: {cause}", file=sys.stderr)
        else:
            log.error(f"error: {cause}")
        if not exit:
            raise cause from None
        raise SystemExit(cause.exit_code) from None


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind ``error``, also one wrapped by Hydra's instantiate (``raise ... from``), or None."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    return cause
