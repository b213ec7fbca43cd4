# Every target installs what it needs into .venv itself: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements/dev.txt | sha1sum | cut -c1-12)

# Tests and benchmarks run against the machine's PostgreSQL and Redis.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/billing
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: run test lint format bench requirements check clean

$(STAMP): requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

## make run: migrate a local SQLite database and serve the app on http://127.0.0.1:8000/
run: $(STAMP)
	DJANGO_DEBUG=$${DJANGO_DEBUG:-true} \
	STRIPE_WEBHOOK_SECRETS=$${STRIPE_WEBHOOK_SECRETS:-whsec_dev_secret} \
	$(BIN)/python manage.py migrate --noinput
	DJANGO_DEBUG=$${DJANGO_DEBUG:-true} \
	STRIPE_WEBHOOK_SECRETS=$${STRIPE_WEBHOOK_SECRETS:-whsec_dev_secret} \
	$(BIN)/python manage.py runserver $${PORT:-127.0.0.1:8000}

## make lint: ruff's lint rules and formatting check (ruff.toml); `make format` applies both
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## make test: lint, then the whole suite against PostgreSQL (and Redis/Celery where a test is about the queue)
test: lint
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test \
	$(BIN)/python manage.py check --fail-level WARNING
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test \
	$(BIN)/python manage.py makemigrations --check --dry-run
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=test \
	$(BIN)/pytest $(PYTEST_ARGS)

## make bench: the benchmarks; results go to bench/results/
bench: $(STAMP)
	DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) DJANGO_SECRET_KEY=bench \
	$(BIN)/python -m bench $(BENCH_ARGS)

## make requirements: re-pin requirements/*.txt from requirements/*.in
requirements: $(STAMP)
	cd requirements && ../$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --output-file base.txt base.in
	cd requirements && ../$(BIN)/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links --output-file dev.txt dev.in

clean:
	rm -rf $(VENV) db.sqlite3 staticfiles
