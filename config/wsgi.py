import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

# Without a broker there is no Celery beat: the app sweeps owed e-mails itself.
from billing.outbox import start_in_process_sweeper  # noqa: E402

start_in_process_sweeper()
