"""``.env``: the development settings ``make run`` writes, read by config/settings.py.

Each case loads the settings of a copy of ``config/`` (so the ``.env`` beside it is the test's
own, never a developer's) in a fresh process whose environment is exactly the one given: a new
shell's, unless the case adds to it. ``import config`` names ``config.settings`` as the settings
module unless the environment names another, as ``manage.py`` and ``celery -A config`` do.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRINT_SETTINGS = (
    "import config; from django.conf import settings; "
    "print(settings.DEBUG, settings.SECRET_KEY, ','.join(settings.STRIPE_WEBHOOK_SECRETS) or '-', settings.EMAIL_URL)"
)
DOT_ENV = """\
# written by make run
DJANGO_DEBUG=true
DJANGO_SECRET_KEY=key-from-dot-env
STRIPE_WEBHOOK_SECRETS=whsec_from_dot_env
EMAIL_URL=consolemail://
"""


@pytest.fixture
def project(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def settings_in(project: Path, **environment) -> subprocess.CompletedProcess:
    env = {"HOME": str(project), "PATH": "/usr/bin:/bin", **environment}
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )


def test_a_new_shell_gets_the_development_settings_from_dot_env(project):
    (project / ".env").write_text(DOT_ENV)

    done = settings_in(project)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "key-from-dot-env", "whsec_from_dot_env", "consolemail://"]


def test_variables_set_in_the_environment_win_over_dot_env(project):
    (project / ".env").write_text(DOT_ENV)

    done = settings_in(project, DJANGO_DEBUG="false", DJANGO_SECRET_KEY="key-from-environment")

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "key-from-environment", "whsec_from_dot_env", "consolemail://"]


def test_a_pytest_session_ignores_dot_env(project):
    """pytest sets PYTEST_VERSION for its session, and the processes its tests start inherit it."""
    (project / ".env").write_text(DOT_ENV)
    assert "PYTEST_VERSION" in os.environ  # this very session: what the settings look for

    done = settings_in(project, PYTEST_VERSION=os.environ["PYTEST_VERSION"], DJANGO_SECRET_KEY="test")

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "test", "-", "consolemail://"]


def test_settings_that_build_on_these_bring_their_own_values_not_dot_env(project):
    """As bench.settings does: the benchmark's figures must not depend on a developer's .env."""
    (project / ".env").write_text(DOT_ENV)
    (project / "derived").mkdir()
    (project / "derived" / "settings.py").write_text("from config.settings import *  # noqa: F403\n")

    done = settings_in(project, DJANGO_SETTINGS_MODULE="derived.settings", DJANGO_SECRET_KEY="derived")

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "derived", "-", "consolemail://"]


def test_without_dot_env_nothing_changes_production_must_set_its_secret_key(project):
    done = settings_in(project)

    assert done.returncode != 0
    assert "Set the DJANGO_SECRET_KEY environment variable" in done.stderr
