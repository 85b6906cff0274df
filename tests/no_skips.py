"""A pytest plugin for CI: a skip nobody expected fails the run instead of passing unseen.

With TANGSHI_NO_SKIPS=1 every skipped test (or module) must match ALLOWED_SKIPS by its
reason, or TANGSHI_ALLOWED_SKIPS (comma-separated parts of test ids, for a skip one CI step
expects, e.g. the PyTorch test where PyTorch is not installed); any other skip is listed and
the run fails. Without the variable the plugin only keeps count.
"""

import os

import pytest

# Skips CI may see on any machine: the mount tests, where the machine refuses mounts to root.
ALLOWED_SKIPS = ("cannot bind-mount read-only", "cannot remount read-only", "cannot mount a small filesystem")

skipped: list[tuple[str, str]] = []


def reason_of(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_collectreport(report):
    if report.skipped:  # a module that skipped itself (importorskip at the top)
        skipped.append((report.nodeid, reason_of(report)))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        skipped.append((report.nodeid, reason_of(report)))


def unexpected(skips, allowed_ids: list[str]) -> list[tuple[str, str]]:
    return [
        (nodeid, reason)
        for nodeid, reason in skips
        if not any(allowed in reason for allowed in ALLOWED_SKIPS) and not any(part in nodeid for part in allowed_ids)
    ]


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("TANGSHI_NO_SKIPS") != "1":
        return
    allowed_ids = [part for part in os.environ.get("TANGSHI_ALLOWED_SKIPS", "").split(",") if part]
    surprises = unexpected(skipped, allowed_ids)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if surprises and reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"{len(surprises)} unexpected skip(s) (TANGSHI_NO_SKIPS=1):", red=True)
        for nodeid, reason in surprises:
            reporter.write_line(f"  {nodeid}: {reason}", red=True)
    if surprises and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
