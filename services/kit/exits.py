"""The exit statuses of every process of the platform, named once (the table: docs/configuration.md).

Kubernetes, Jobs, `make` and CI see only the number, so each value keeps one meaning across the services, the
tools and the local stack. Two meanings that predate this table share a value; they are aliases below (an
alias is the same member: `ExitCode(3)` prints as SHUTDOWN_TIMEOUT), each kept for the readers that know it.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    # Done: a bounded run finished, a check passed, or a service stopped on SIGTERM after flushing and
    # committing. A Job succeeds; a Deployment's pod is simply replaced.
    OK = 0
    # The work failed (start-up, a dependency, a flush, a load) or a check found a problem (a schema change
    # is breaking, generated files are out of date, the stores disagree). The message or the log says which.
    # A Deployment restarts the pod (back-off); a Job counts a failure and retries within backoffLimit.
    FAILED = 1
    # Bad or missing configuration or arguments: the message names the variable (or option) and nothing was
    # done. A restart gives the same answer: fix the environment, ConfigMap or Secret. argparse uses 2 too.
    CONFIG = 2
    # The reconciliation could not read a store (named in the message): nothing was compared, no verdict is
    # given on partial data. Shares 2 with CONFIG: both mean "no answer, look at the message".
    NO_VERDICT = 2
    # SIGTERM's flush and commit took longer than SHUTDOWN_TIMEOUT_S: the process left without a clean
    # commit. Nothing is lost (the next start reprocesses from the last commit); raise the budget, or
    # terminationGracePeriodSeconds, if it repeats.
    SHUTDOWN_TIMEOUT = 3
    # `python -m services.stack status` found no local stack (the LSB convention for `status`: "program is
    # not running"). Shares 3 with SHUTDOWN_TIMEOUT: a developer tool that no Kubernetes object runs.
    NOT_RUNNING = 3
    # Tests only: SNOWFLAKE_LOADER_FAIL_AFTER made the Snowflake loader die right after a step, as a crash
    # would, so a test can check the next start. Never seen in production (the variable is unset).
    INJECTED_CRASH = 86
    # Ctrl-C (128 + SIGINT, the shell's convention) ended a foreground run (`make run`) after stopping what
    # it had started.
    INTERRUPTED = 130


def killed_by(signum: int) -> int:
    """The status a shell reports for a process a signal ended (128 + the signal number): 143 for SIGTERM."""
    return 128 + signum
