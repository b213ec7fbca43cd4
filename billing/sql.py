"""Hand-written SQL for the webhook's hot path: rows in, rows out, history rows alongside.

Why the handlers' services do not use the ORM (docs/decisions/0005-webhook-hot-path-sql.rst):
measured here, a ``QuerySet.get()`` costs the web process about six times the CPU of the same
SELECT sent by hand (the ORM compiles the query anew on every call), and ``Model.save()`` with
its django-simple-history record about fifteen times an UPDATE that writes its history row in
the same statement. A webhook sends 5 to 30 statements, so this was most of what one cost.
Everything else (admin, REST API, commands, account merges) keeps the ORM on the same tables.

What this module guarantees:

* Statements are built from the models' ``_meta`` (no column list is written by hand), once
  per table, so a migration that adds a field is picked up without touching this code.
* Every write records the historical row that simple-history would: the same tracked columns,
  ``history_type`` ``+`` / ``~`` / ``-``, the caller's change reason, and as ``history_user``
  the authenticated user of the current request (what simple-history's middleware provides;
  none for Stripe's deliveries, the staff member for an admin's re-process).
* On PostgreSQL a write and its history row are ONE statement (a data-modifying CTE whose
  ``RETURNING`` feeds the history ``INSERT``), so the history row is exactly the row written,
  even when another transaction changed other columns of it meanwhile. Elsewhere (SQLite, for
  ``make run``) they are two statements in the caller's transaction.
* Rows come back as model instances (``Model.from_db``), so services still read ``sub.quantity``
  and the admin sees ordinary rows. ``auto_now`` / ``auto_now_add`` fields are set as
  ``save()`` would set them.
* Inside ``deferred_writes()`` (the inbox runs every handler there), a write that reads
  nothing back is not sent at once: it goes out in front of the next statement, as CTEs of
  that statement, unless that statement names a table it writes (then it goes alone, first).
  Every other statement (the ORM's, a savepoint) and the end of the block send it first, so
  no statement can see the database without it. On PostgreSQL only.

Nothing here opens a transaction: callers run inside the inbox's.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections, models
from django.utils import timezone
from simple_history.models import HistoricalRecords

HISTORY_REASON_MAX = 100  # simple-history's history_change_reason is a varchar(100)
_HISTORY_OWN = {"history_id", "history_date", "history_change_reason", "history_type", "history_user_id"}
CREATED, CHANGED, DELETED = "+", "~", "-"


# A transaction-level advisory lock named by a string (PostgreSQL): released at COMMIT or ROLLBACK.
ADVISORY_LOCK = "pg_advisory_xact_lock(hashtextextended(%s, 0))"


class Expr:
    """A value written as SQL (``Expr("GREATEST(starts_at, %s)", [at])``) instead of a parameter."""

    __slots__ = ("sql", "params")

    def __init__(self, sql: str, params: Sequence = ()):
        self.sql, self.params = sql, list(params)


def attach(obj: models.Model, name: str, related: models.Model) -> None:
    """Cache ``related`` as ``obj.<name>`` (a foreign key), as ``select_related`` would."""
    obj._meta.get_field(name).set_cached_value(obj, related)


@cache
def is_postgresql() -> bool:
    """The project uses one database; its vendor is asked once per process."""
    return connections[DEFAULT_DB_ALIAS].vendor == "postgresql"


def _params(params: Sequence) -> Sequence:
    return params if is_postgresql() else [adapt(p) for p in params]


def for_update() -> str:
    """The row-lock clause, or nothing where the database has no row locks (SQLite).

    Lock in a statement of its own, before reading what the lock protects: a statement sees
    rows as they were when it started, even if it then waited for the lock.
    """
    if not connection.features.has_select_for_update:
        return ""
    return " FOR UPDATE"


def adapt(value: Any) -> Any:
    """A parameter as the database wants it (SQLite stores datetimes as naive UTC text)."""
    if isinstance(value, datetime):
        return connection.ops.adapt_datetimefield_value(value)
    return value


def utc_day(instant: datetime) -> tuple[datetime, datetime]:
    """[start, end) of ``instant``'s UTC calendar date: "same UTC date" as an index-friendly range."""
    start = instant.astimezone(dt_timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def cursor():
    """A cursor of the default connection, one for all the statements the connection sends.

    ``connection.cursor()`` builds a new database cursor each time (about 25 µs of the web
    process's CPU with psycopg, whose cursors each copy their adapters), and a webhook sends
    several statements. This one is kept on the connection and replaced when the connection
    is (Django reconnects after ``CONN_MAX_AGE``, or after an error). While queries are being
    logged (``DEBUG``, ``CaptureQueriesContext``) a fresh debug cursor is given, so every
    statement is still recorded. Never close the cursor returned.
    """
    db = connections[DEFAULT_DB_ALIAS]  # this thread's wrapper (``connection`` is a proxy shared by all)
    if db.queries_logged:
        return db.cursor()
    raw = db.connection
    kept = getattr(db, "_billing_cursor", None)
    if kept is not None and raw is not None and kept[0] is raw:
        return kept[1]
    fresh = db.cursor()  # connects if needed
    db._billing_cursor = (db.connection, fresh)
    return fresh


def one(sql: str, params: Sequence = ()) -> tuple | None:
    c = cursor()
    c.execute(*_with_deferred(sql, _params(params)))
    return c.fetchone()


def rows(sql: str, params: Sequence = ()) -> list[tuple]:
    c = cursor()
    c.execute(*_with_deferred(sql, _params(params)))
    return c.fetchall()


def execute(sql: str, params: Sequence = ()) -> None:
    """Send a statement whose result nobody reads."""
    cursor().execute(*_with_deferred(sql, _params(params)))


# --- Deferred writes -----------------------------------------------------------------------

class _Deferred:
    """Writes that read nothing back, waiting to go out with the next statement.

    Each is a data-modifying CTE (and its history CTE). The next statement this module sends
    carries them in front of its own CTEs, unless its text names a table they write (then
    they go out first, alone): a statement that does not name a table cannot see what was
    written to it, so sending the write with it, or before it, is the same. Any statement
    sent some other way (the ORM, a savepoint, the inbox) flushes them first (``guard``, an
    ``execute_wrapper``), and so does leaving ``deferred_writes()`` before its COMMIT.
    """

    def __init__(self):
        self.ctes: list[str] = []
        self.params: list = []
        self.tables: set[str] = set()

    def names_written_table(self, sql: str) -> bool:
        # A table's name as a whole word, quoted or not ("billing_invoice" is not named by
        # "billing_invoicelineitem"); a column or alias of the same spelling only costs a
        # needless flush.
        pattern = r"(?<![\w$])(?:" + "|".join(sorted(map(re.escape, self.tables))) + r")(?![\w$])"
        return re.search(pattern, sql) is not None

    def add(self, table: "Table", write_sql: str, params: list, history_type: str, reason) -> None:
        if self.names_written_table(write_sql):
            self.flush()
        name = f"_deferred{len(self.ctes)}"
        self.ctes.append(f"{name} AS ({write_sql})")
        self.params.extend(params)
        if table.history_table is not None:
            history_sql, history_params = table._history_sql(name, history_type, reason)
            self.ctes.append(f"{name}_history AS ({history_sql})")
            self.params.extend(history_params)
        self.tables.update(table.bare_names)

    def take(self) -> tuple[str, list]:
        ctes, params = ", ".join(self.ctes), self.params
        self.ctes, self.params, self.tables = [], [], set()
        return ctes, params

    def flush(self) -> None:
        if self.ctes:
            ctes, params = self.take()
            cursor().execute(f"WITH {ctes} SELECT 1", params)

    def guard(self, execute, sql, params, many, context):
        if self.ctes:
            self.flush()
        return execute(sql, params, many, context)


_deferred: ContextVar[_Deferred | None] = ContextVar("billing_deferred_writes", default=None)


@contextmanager
def deferred_writes():
    """Within: writes that read nothing back go out with the next statement (PostgreSQL only).

    The inbox runs each handler within: a handler's writes were one statement each, and most
    are followed by another statement of the same handler that can carry them. Leaving the
    block normally sends what is still waiting; leaving it by an exception drops it (the
    transaction is being rolled back).
    """
    if not is_postgresql() or _deferred.get() is not None:
        yield
        return
    pending = _Deferred()
    token = _deferred.set(pending)
    try:
        with connections[DEFAULT_DB_ALIAS].execute_wrapper(pending.guard):
            yield
            pending.flush()
    finally:
        _deferred.reset(token)


def _with_deferred(sql: str, params: list) -> tuple[str, list]:
    """``sql`` with the waiting writes in front, or as it is (after sending them, if it names their tables)."""
    pending = _deferred.get()
    if pending is None or not pending.ctes:
        return sql, params
    if pending.names_written_table(sql) or sql.startswith("WITH RECURSIVE"):
        pending.flush()
        return sql, params
    ctes, deferred_params = pending.take()
    if sql.startswith("WITH "):
        return f"WITH {ctes}, {sql[5:]}", [*deferred_params, *params]
    return f"WITH {ctes} {sql}", [*deferred_params, *params]


def _history_user_id():
    request = getattr(HistoricalRecords.context, "request", None)
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return user.pk
    return None


class Table:
    """A model's table and its simple-history table, as SQL fragments."""

    def __init__(self, model: type[models.Model]):
        meta = model._meta
        qn = connection.ops.quote_name
        self.model = model
        self.name = qn(meta.db_table)
        self.fields = list(meta.concrete_fields)
        self.columns = [f.column for f in self.fields]
        self.attnames = [f.attname for f in self.fields]
        self.field_by_attname = {f.attname: f for f in self.fields}
        self.pk = meta.pk
        self.pk_column = qn(meta.pk.column)
        self._quoted = {f.attname: qn(f.column) for f in self.fields}
        self.auto_now = [f.attname for f in self.fields if getattr(f, "auto_now", False)]
        self.auto_now_add = [f.attname for f in self.fields if getattr(f, "auto_now_add", False)]
        self.insertable = [f for f in self.fields if f is not meta.pk or not meta.pk.auto_created]
        self.select_list = ", ".join(self.column_list())
        history = getattr(model, "history", None)
        self.history_table = None
        self.bare_names = {meta.db_table}  # as the text of a statement may name them (``_Deferred``)
        if history is not None:
            history_meta = history.model._meta
            own_columns = set(self.columns)
            history_columns = [f.column for f in history_meta.concrete_fields]
            unknown = [c for c in history_columns if c not in own_columns and c not in _HISTORY_OWN]
            if unknown:
                raise RuntimeError(f"{history_meta.db_table} has columns {unknown} that {meta.db_table} has not")
            self.history_table = qn(history_meta.db_table)
            self.tracked = [qn(c) for c in history_columns if c in own_columns]
            self.bare_names.add(history_meta.db_table)
        self._converters = None

    def __str__(self) -> str:
        return self.name

    def column_list(self, alias: str | None = None) -> list[str]:
        prefix = f"{alias}." if alias else ""
        return [prefix + self._quoted[a] for a in self.attnames]

    def cols(self, alias: str | None = None) -> str:
        """The select list of every column, in the order ``load`` expects."""
        return ", ".join(self.column_list(alias)) if alias else self.select_list

    def col(self, attname: str) -> str:
        return self._quoted[attname]

    @property
    def width(self) -> int:
        return len(self.fields)

    # --- reading ---------------------------------------------------------------------------

    def load(self, row: Sequence, offset: int = 0) -> models.Model:
        """The model instance of ``row[offset:offset + width]`` (a row of ``cols()``)."""
        values = row[offset : offset + len(self.fields)]
        if not is_postgresql():
            values = self._convert(values)
        return self.model.from_db(connection.alias, self.attnames, values)

    def _convert(self, values: Sequence) -> list:
        """Apply the database's converters (SQLite returns naive datetimes, 0/1 booleans)."""
        if self._converters is None:
            self._converters = []
            for field in self.fields:
                expression = field.get_col(self.model._meta.db_table)
                converters = connection.ops.get_db_converters(expression) + field.get_db_converters(connection)
                self._converters.append((expression, converters))
        out = []
        for value, (expression, converters) in zip(values, self._converters):
            for converter in converters:
                value = converter(value, expression, connection)
            out.append(value)
        return out

    def get(self, where: str, params: Sequence = (), *, lock: bool = False) -> models.Model | None:
        row = one(f"SELECT {self.cols()} FROM {self.name} WHERE {where}{for_update() if lock else ''}", params)
        return None if row is None else self.load(row)

    def filter(self, where: str, params: Sequence = (), *, order_by: str = "", lock: bool = False) -> list:
        order = f" ORDER BY {order_by}" if order_by else ""
        found = rows(f"SELECT {self.cols()} FROM {self.name} WHERE {where}{order}{for_update() if lock else ''}", params)
        return [self.load(row) for row in found]

    # --- writing ---------------------------------------------------------------------------

    def _history_sql(self, source: str, history_type: str, reason: str | Expr | None) -> tuple[str, list]:
        """``INSERT`` of the history rows of every row of ``source`` (a CTE or a filtered table).

        ``reason`` may be an ``Expr`` over the written row's columns: one statement that writes
        several rows for different reasons gives each its own.
        """
        columns = ", ".join(self.tracked)
        if isinstance(reason, Expr):
            reason_sql, reason_params = f"SUBSTR({reason.sql}, 1, {HISTORY_REASON_MAX})", reason.params
        else:
            reason_sql, reason_params = "%s", [reason[:HISTORY_REASON_MAX] if reason else None]
        sql = (
            f"INSERT INTO {self.history_table} ({columns}, history_date, history_change_reason, history_type,"
            f" history_user_id) SELECT {columns}, %s, {reason_sql}, %s, %s FROM {source}"
        )
        return sql, [timezone.now(), *reason_params, history_type, _history_user_id()]

    def _write(self, write_sql: str, params: list, history_type: str, reason: str | None,
               returning: bool, then: Expr | None = None) -> Any:
        """Run ``write_sql`` (ending ``RETURNING *``) and record a history row per row it wrote.

        With ``returning``, the rows written (``cols()`` order). Without, nothing is read back
        (no rows to send, convert and load), except the value of ``then`` if given: a SQL
        expression evaluated in the same round trip (on PostgreSQL it sees the database as the
        statement began, not the row just written; on SQLite, a statement of its own, after).
        With both, ``(rows, value)``; the value is None if nothing was written.
        """
        bare = write_sql[: -len(" RETURNING *")]
        if returning and then is not None:
            if is_postgresql():
                history_sql, history_params = ("", [])
                if self.history_table is not None:
                    history_sql, history_params = self._history_sql("written", history_type, reason)
                    history_sql = f", history AS ({history_sql})"
                found = rows(
                    f"WITH written AS ({write_sql}){history_sql} SELECT {self.cols()}, {then.sql} FROM written",
                    [*params, *history_params, *then.params],
                )
                return [row[:-1] for row in found], (found[0][-1] if found else None)
            written = self._write(write_sql, params, history_type, reason, returning=True)
            return written, (_then(then) if written else None)
        if is_postgresql() and self.history_table is not None:
            if not returning and then is None and (pending := _deferred.get()) is not None:
                pending.add(self, write_sql, params, history_type, reason)
                return None
            history_sql, history_params = self._history_sql("written", history_type, reason)
            if not returning:
                if then is None:
                    execute(f"WITH written AS ({write_sql}) {history_sql}", [*params, *history_params])
                    return None
                return one(
                    f"WITH written AS ({write_sql}), history AS ({history_sql}) SELECT {then.sql}",
                    [*params, *history_params, *then.params],
                )[0]
            return rows(
                f"WITH written AS ({write_sql}), history AS ({history_sql}) SELECT {self.cols()} FROM written",
                [*params, *history_params],
            )
        if self.history_table is None and not returning:
            if then is None and (pending := _deferred.get()) is not None:
                pending.add(self, write_sql, params, history_type, reason)
                return None
            execute(bare, params)
            return _then(then)
        written = rows(f"{bare} RETURNING {self.cols()}", params)
        if written and self.history_table is not None:  # SQLite: the history rows in a second statement
            pk_index = self.attnames.index(self.pk.attname)
            pks = [row[pk_index] for row in written]
            history_sql, history_params = self._history_sql(
                f"{self.name} WHERE {self.pk_column} IN ({', '.join(['%s'] * len(pks))})", history_type, reason
            )
            execute(history_sql, [*history_params, *pks])
        return written if returning else _then(then)

    def _insert_values(self, values: dict) -> tuple[list[str], list[str], list]:
        """(columns, their placeholders, parameters): a value may be an ``Expr`` (a subquery)."""
        now = timezone.now()
        columns, placeholders, params = [], [], []
        for field in self.insertable:
            name = field.attname
            if name in values:
                value = values[name]
            elif name in self.auto_now or name in self.auto_now_add:
                value = now
            else:
                value = field.get_default()
            columns.append(self._quoted[name])
            if isinstance(value, Expr):
                placeholders.append(value.sql)
                params.extend(value.params)
            else:
                placeholders.append("%s")
                params.append(value)
        return columns, placeholders, params

    def insert(
        self, values: dict, *, reason: str | None = None, on_conflict: Sequence[str] | None = None
    ) -> models.Model | None:
        """Insert one row (defaults as ``Model()`` gives them); None if ``on_conflict`` skipped it."""
        return next(iter(self.insert_many([values], reason=reason, on_conflict=on_conflict)), None)

    def insert_then(
        self, values: dict, then: Expr, *, reason: str | None = None, on_conflict: Sequence[str] | None = None
    ) -> tuple[models.Model | None, Any]:
        """``insert``, and the value of ``then`` read in the same round trip (as ``_write`` says).

        (None, None) if ``on_conflict`` skipped the row.
        """
        columns, placeholders, params = self._insert_values(values)
        sql = (f"INSERT INTO {self.name} ({', '.join(columns)}) VALUES ({', '.join(placeholders)})"
               f"{self._conflict(on_conflict)} RETURNING *")
        written, value = self._write(sql, params, CREATED, reason, returning=True, then=then)
        return (self.load(written[0]), value) if written else (None, None)

    def insert_where(
        self, values: dict, where: Expr, *, then: Expr, reason: str | None = None,
        on_conflict: Sequence[str] | None = None,
    ) -> Any:
        """Insert one row only if ``where`` holds (``INSERT ... SELECT ... WHERE``): the value of ``then``.

        Nothing is read back but ``then``, which on PostgreSQL comes in the same round trip and
        sees the database as the statement began (``_write``). One statement where a read and
        a conditional INSERT would be two.
        """
        columns, placeholders, params = self._insert_values(values)
        sql = (f"INSERT INTO {self.name} ({', '.join(columns)}) SELECT {', '.join(placeholders)} WHERE {where.sql}"
               f"{self._conflict(on_conflict)} RETURNING *")
        return self._write(sql, [*params, *where.params], CREATED, reason, returning=False, then=then)

    def _conflict(self, on_conflict: Sequence[str] | None) -> str:
        if on_conflict is None:
            return ""
        target = ", ".join(self._quoted.get(c, c) for c in on_conflict)
        return f" ON CONFLICT ({target}) DO NOTHING" if target else " ON CONFLICT DO NOTHING"

    def insert_many(
        self, many: Iterable[dict], *, reason: str | None = None, on_conflict: Sequence[str] | None = None,
        returning: bool = True,
    ) -> list[models.Model]:
        """Insert rows in one statement; the rows inserted (not those ``on_conflict`` skipped).

        ``returning=False`` reads nothing back and returns [].
        """
        columns, groups, params = None, [], []
        for values in many:
            columns, placeholders, row_params = self._insert_values(values)
            groups.append("(" + ", ".join(placeholders) + ")")
            params.extend(row_params)
        if not groups:
            return []
        conflict = self._conflict(on_conflict)
        sql = f"INSERT INTO {self.name} ({', '.join(columns)}) VALUES {', '.join(groups)}{conflict} RETURNING *"
        if not returning:
            self._write(sql, params, CREATED, reason, returning=False)
            return []
        return [self.load(row) for row in self._write(sql, params, CREATED, reason, returning=True)]

    def update(self, obj: models.Model, values: dict, *, reason: str | None = None, then: Expr | None = None) -> Any:
        """Write ``values`` (and ``auto_now`` fields) to ``obj``'s row, and to ``obj``.

        Nothing is read back (but the value of ``then``, as ``_write`` says): ``obj`` takes the
        values written. Only the columns in ``values`` are written, so a concurrent writer of
        other columns (refunds, receipts) is not overwritten, and the history row, made from
        the row as the UPDATE left it, shows both.
        """
        if any(isinstance(value, Expr) for value in values.values()):
            raise TypeError("update() sets obj from the values: use update_where() for SQL expressions")
        now = timezone.now()
        result = self.update_where(values, f"{self.pk_column} = %s", [obj.pk], reason=reason, now=now, then=then)
        for name, value in values.items():
            setattr(obj, name, value)
        for name in self.auto_now:
            if name not in values:
                setattr(obj, name, now)
        return result

    def update_where(self, values: dict, where: str, params: Sequence = (), *, reason: str | None = None,
                     now: datetime | None = None, then: Expr | None = None) -> Any:
        """``UPDATE ... WHERE where`` with a ``~`` history row each (nothing read back but ``then``)."""
        now = now or timezone.now()
        assignments, set_params = [], []
        for name, value in values.items():
            if isinstance(value, Expr):
                assignments.append(f"{self._quoted[name]} = {value.sql}")
                set_params.extend(value.params)
            else:
                assignments.append(f"{self._quoted[name]} = %s")
                set_params.append(value)
        for name in self.auto_now:
            if name not in values:
                assignments.append(f"{self._quoted[name]} = %s")
                set_params.append(now)
        sql = f"UPDATE {self.name} SET {', '.join(assignments)} WHERE {where} RETURNING *"
        return self._write(sql, [*set_params, *params], CHANGED, reason, returning=False, then=then)

    def delete_where(self, where: str, params: Sequence = (), *, reason: str | None = None) -> None:
        """``DELETE ... WHERE where`` with a ``-`` history row each (nothing read back)."""
        params = list(params)
        if self.history_table is None:
            execute(f"DELETE FROM {self.name} WHERE {where}", params)
        elif is_postgresql():
            history_sql, history_params = self._history_sql("gone", DELETED, reason)
            execute(
                f"WITH gone AS (DELETE FROM {self.name} WHERE {where} RETURNING *) {history_sql}",
                [*params, *history_params],
            )
        else:
            history_sql, history_params = self._history_sql(f"{self.name} WHERE {where}", DELETED, reason)
            execute(history_sql, [*history_params, *params])
            execute(f"DELETE FROM {self.name} WHERE {where}", params)


def _then(then: Expr | None) -> Any:
    return None if then is None else one(f"SELECT {then.sql}", then.params)[0]


_tables: dict[type, Table] = {}


def table(model: type[models.Model]) -> Table:
    """The ``Table`` of ``model``, built on first use (after the app registry is ready)."""
    found = _tables.get(model)
    if found is None:
        found = _tables[model] = Table(model)
    return found
