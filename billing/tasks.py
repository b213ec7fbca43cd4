"""Celery tasks (placeholder until the e-mail work lands)."""
from celery import shared_task


@shared_task
def send_owed_email(owed_id):
    return None


@shared_task
def sweep_owed_emails():
    return 0
