"""The project's errors: one small tree, each message written for the person who must act on it.

Every error a user can cause derives from `DistillError`. The CLI prints `str(err)` on one line
and exits with `err.exit_code`; no traceback. A message names the bad value, where it came from
(file:line, prompt id, URL, HTTP status) and what to do next.

Errors that the harvester may retry (`TransientError`) are kept apart from those it must not:
a retry policy that cannot tell them apart either pays twice or gives up too early.
"""

from __future__ import annotations

# Exit codes: scripts and cron jobs rely on these; every command uses this one table (README,
# "Exit codes"), so the same mistake gives the same code in every stage.
EXIT_OK = 0  # the job is done
EXIT_FAILED = 1  # the job failed: fix the cause (the message says what) and rerun
EXIT_USAGE = 2  # bad flags, config or input (a missing file or run directory): nothing was done
EXIT_PARTIAL = 3  # partly done (a cap was reached, some prompts failed): rerun to continue
EXIT_LOCKED = 75  # another run holds the run directory (EX_TEMPFAIL): try again later
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM (128 + SIGINT): rerun to continue


class DistillError(Exception):
    """A problem the user can fix; the message says how."""

    exit_code = EXIT_FAILED


class ConfigError(DistillError):
    """A config file, key or flag is wrong."""

    exit_code = EXIT_USAGE


class InputError(DistillError):
    """An input file (prompts, dataset, model folder) is missing or malformed."""

    exit_code = EXIT_USAGE


class StoreError(DistillError):
    """The run directory or its SQLite store cannot be used as asked."""


class RunLockedError(StoreError):
    """Another process holds the run directory: not a failure, cron can just try again later."""

    exit_code = EXIT_LOCKED


class TeacherError(DistillError):
    """The teacher API refused the whole run (bad key, unknown model or URL): stop at once."""


class TrainingError(DistillError):
    """Fine-tuning cannot start or go on as configured."""


# Not user-facing: raised inside the harvester's retry loop.


class TransientError(Exception):
    """A request failed in a way that may succeed if tried again (timeout, 429, 5xx, garbage body)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class PromptRejected(Exception):
    """The server rejected this one request (400/422): record it as this prompt's failure, go on."""

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status = status


class Unreachable(DistillError, TransientError):
    """The server was never reached (connection refused, unknown host, TLS failure): retried a
    few times over seconds (ratelimit.py), then the run stops: it is a configuration mistake,
    not a passing fault. Once a server has answered, losing it is a plain TransientError."""
