"""Settings read from the environment work as README.rst documents them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SEND_ONE = (
    "import django; django.setup();"
    "from django.conf import settings; from django.core.mail import send_mail;"
    "send_mail('Receipt for invoice RP-1', 'body', 'billing@example.com', ['owner@example.com']);"
    "print(settings.EMAIL_FILE_PATH)"
)


def test_filemail_with_an_absolute_path_writes_the_emails_there(tmp_path):
    """``EMAIL_URL=filemail:///path``: the e-mails land in ``/path``, whatever the working directory."""
    maildir = tmp_path / "srv" / "mail"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DJANGO_SECRET_KEY": "test",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "EMAIL_URL": f"filemail://{maildir}",
    }
    assert str(maildir).startswith("/")

    done = subprocess.run(
        [sys.executable, "-c", SEND_ONE], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(maildir)
    written = list(maildir.iterdir())
    assert len(written) == 1 and "Receipt for invoice RP-1" in written[0].read_text()
    assert not (elsewhere / "srv").exists()
