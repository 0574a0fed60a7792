"""The ops CLI (manage.py sandbox) as ops type it: options anywhere before ``--``, and the
command after ``--`` passed on verbatim, against a real running sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from sandboxes.models import Sandbox
from tests.fixtures.live import ROOT, server_env

pytestmark = pytest.mark.django_db(transaction=True)
EMAIL = "ops@agents.test"
ECHO_ARGS = ["sh", "-c", 'echo "$@"', "sh", "--", "-x", "--timeout"]  # prints "-- -x --timeout"


@pytest.fixture
def ops_sandbox(sandbox_for: Callable[..., Sandbox]) -> Sandbox:
    return sandbox_for(EMAIL)


def test_it_takes_exec_options_between_the_user_and_the_command(ops_sandbox: Sandbox) -> None:
    out = StringIO()
    call_command("sandbox", "exec", EMAIL, "--timeout", "50", "--", *ECHO_ARGS, stdout=out)
    assert out.getvalue() == "-- -x --timeout\n"
    out = StringIO()
    call_command("sandbox", "exec", "--timeout", "50", EMAIL, "--", "id", "-u", stdout=out)
    assert out.getvalue().strip().isdigit() and out.getvalue().strip() != "0"


def test_it_honours_the_exec_timeout_given_before_the_command(ops_sandbox: Sandbox) -> None:
    with pytest.raises(CommandError, match=r"Timed out after 1\.0 s"):
        call_command(
            "sandbox", "exec", EMAIL, "--timeout", "1", "--", "sleep", "20", stdout=StringIO()
        )


def test_it_refuses_a_command_given_before_the_double_dash(ops_sandbox: Sandbox) -> None:
    with pytest.raises(CommandError, match="after --"):
        call_command("sandbox", "exec", EMAIL, "ls", "--", "id", stdout=StringIO())


def test_manage_py_runs_exec_with_a_timeout(
    ops_sandbox: Sandbox, sandbox_dirs: dict[str, str]
) -> None:
    """The real command line: ``manage.py sandbox exec USER --timeout 50 -- CMD``."""
    argv = [sys.executable, "manage.py", "sandbox", "exec", EMAIL, "--timeout", "50", "--"]
    done = subprocess.run(
        [*argv, *ECHO_ARGS],
        cwd=ROOT,
        env=server_env(**sandbox_dirs, DJANGO_SETTINGS_MODULE=os.environ["DJANGO_SETTINGS_MODULE"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, "-- -x --timeout\n"), done.stderr[-2000:]
