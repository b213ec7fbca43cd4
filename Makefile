# Every target installs what it needs into .venv itself: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements/dev.txt | sha1sum | cut -c1-12)

# Tests and benchmarks run against the machine's PostgreSQL and Redis.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/billing
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: run test test-faults browser lint format bench soak requirements check clean

$(STAMP): requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

## make run: write .env (once), migrate a local SQLite database, serve the app on http://127.0.0.1:8000/
run: $(STAMP) .env
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py runserver $${PORT:-127.0.0.1:8000}

# Development settings, read by config/settings.py in every shell (set variables win). Written
# only when absent: edit it freely, or delete it to get a new one. Git-ignored: it holds a secret.
.env: | $(STAMP)
	key=$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(50))') && umask 077 && printf '%s\n' \
	  '# Development settings written by `make run` (git-ignored). A variable set in the' \
	  '# environment wins over this file; README.rst lists every setting.' \
	  'DJANGO_DEBUG=true' \
	  "DJANGO_SECRET_KEY=$$key" \
	  'STRIPE_WEBHOOK_SECRETS=whsec_dev_secret' \
	  'EMAIL_URL=consolemail://' > $@.tmp && mv $@.tmp $@

## make lint: ruff's lint rules and formatting check (ruff.toml); `make format` applies both
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## make test: lint, then the suite but the fault tests (make test-faults) against PostgreSQL (and Redis/Celery where a test is about the queue)
# The migration check compares models with migrations only, on an in-memory database: a fresh
# machine has no "billing" database, and the history check would warn about it.
test: lint browser
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test \
	$(BIN)/python manage.py check --fail-level WARNING
	DATABASE_URL=sqlite://:memory: DJANGO_SECRET_KEY=test $(BIN)/python manage.py makemigrations --check --dry-run
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test \
	$(BIN)/pytest -m "not faults" $(PYTEST_ARGS)

## make browser: Debian's chromium and chromium-driver for the browser test (billing/tests/test_admin_browser.py)
browser:
	test -x /usr/bin/chromedriver || apt-get install -y -qq chromium chromium-driver \
	  || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

## make test-faults: the fault tests (pytest -m faults): gunicorn, Celery, PgBouncer, Redis and a
## throwaway PostgreSQL as child processes, broken on purpose; a few minutes. Installs pgbouncer.
test-faults: $(STAMP)
	command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || apt-get install -y -qq pgbouncer \
	  || (apt-get update -qq && apt-get install -y -qq pgbouncer)
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test \
	$(BIN)/pytest -m faults $(PYTEST_ARGS)

## make bench: the benchmarks; results go to bench/results/
bench: $(STAMP)
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=bench \
	$(BIN)/python -m bench $(BENCH_ARGS)

## make soak: the mix at ~70% of its peak for 10 minutes; results in bench/results/soak.md (not in CI)
soak: $(STAMP)
	DATABASE_URL=$(TEST_DATABASE_URL) DJANGO_SECRET_KEY=bench $(BIN)/python -m bench.soak $(SOAK_ARGS)

## make requirements: re-pin requirements/*.txt from requirements/*.in
requirements: $(STAMP)
	cd requirements && ../$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --output-file base.txt base.in
	cd requirements && ../$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --output-file dev.txt dev.in

clean:
	rm -rf $(VENV) db.sqlite3 staticfiles
