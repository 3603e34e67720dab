"""The receiver's SQLite schema, how a connection is opened, and the migrations that bring a
database made by an older receiver up to this one's schema (PRAGMA user_version).

To change the schema (step 3 below did this for the error groups' `status`):

1. change the table in `SCHEMA`, which is always the latest schema (a new database is made
   from it alone: `status TEXT NOT NULL DEFAULT 'open'` in `error_groups`);
2. append a step to `MIGRATIONS` with the next number and the statements that turn a
   database of the number before into one of this number
   (`"ALTER TABLE error_groups ADD COLUMN status TEXT NOT NULL DEFAULT 'open'"`);

   `SCHEMA` then runs as well (its `IF NOT EXISTS` statements add new tables and indexes,
   also those over a column a step added), so a step only changes what already exists;
3. test it on a database made by the receiver before the change (tests/receiver_server/
   test_storage.py and test_notify.py have one for each step).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import NamedTuple

from beatlib.receiver import rollup

logger = logging.getLogger("beatlib.receiver")

SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY,
    environment TEXT,
    version TEXT,               -- the latest seen
    agent TEXT,                 -- "beatlib 0.1.0"
    language TEXT,
    framework TEXT,
    hostname TEXT,
    first_seen INTEGER NOT NULL,  -- µs since epoch, when received
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    service TEXT NOT NULL,
    version TEXT NOT NULL,      -- service.version in metadata, or a recorded release
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    -- set by `beatlib release` (POST /beatlib/v1/releases); NULL for versions only seen
    deployed_at TEXT,           -- ISO 8601
    environment TEXT,
    branch TEXT,
    commit_sha TEXT,
    previous TEXT,
    commits TEXT,               -- JSON [{commit, author, subject}]
    PRIMARY KEY (service, version)
);
CREATE TABLE IF NOT EXISTS transactions (
    id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    parent_id TEXT,
    service TEXT NOT NULL,
    service_version TEXT,
    environment TEXT,
    name TEXT NOT NULL,         -- "" when the agent sent none
    type TEXT NOT NULL,
    result TEXT,
    outcome TEXT,
    timestamp INTEGER NOT NULL, -- µs since epoch
    duration REAL NOT NULL,     -- ms
    sampled INTEGER,
    spans_started INTEGER,
    spans_dropped INTEGER,
    context TEXT                -- JSON
);
CREATE UNIQUE INDEX IF NOT EXISTS transactions_id ON transactions (id);
CREATE INDEX IF NOT EXISTS transactions_trace ON transactions (trace_id, parent_id);
-- one transaction name's rows over time (latest, distribution, samples) without the table
CREATE INDEX IF NOT EXISTS transactions_name_time
    ON transactions (service, name, timestamp, duration, outcome, result);
CREATE INDEX IF NOT EXISTS transactions_release_stats
    ON transactions (service, service_version, name, duration, outcome, result);
CREATE TABLE IF NOT EXISTS spans (
    id TEXT NOT NULL,
    transaction_id TEXT,
    trace_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    subtype TEXT,
    action TEXT,
    timestamp INTEGER,          -- µs since epoch; or:
    start REAL,                 -- ms after the transaction's start
    duration REAL NOT NULL,
    outcome TEXT,
    sync INTEGER,
    context TEXT,               -- JSON
    stacktrace TEXT,            -- JSON
    -- the dependency an exit span calls: context.destination.service.resource, else its
    -- service target "type/name" (rows.destination); NULL for other spans
    destination TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS spans_id ON spans (id, trace_id);
CREATE INDEX IF NOT EXISTS spans_transaction ON spans (transaction_id);
CREATE INDEX IF NOT EXISTS spans_trace ON spans (trace_id);
CREATE TABLE IF NOT EXISTS errors (
    id TEXT NOT NULL,
    service TEXT NOT NULL,
    service_version TEXT,
    environment TEXT,
    grouping_key TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    trace_id TEXT,
    transaction_id TEXT,
    parent_id TEXT,
    transaction_name TEXT,
    culprit TEXT,
    type TEXT,                  -- exception type, or NULL for a logged message
    message TEXT,
    handled INTEGER,
    level TEXT,
    assignee_key TEXT,          -- lower-cased email, else name
    body TEXT NOT NULL          -- the whole event, JSON
);
CREATE UNIQUE INDEX IF NOT EXISTS errors_id ON errors (id);
CREATE INDEX IF NOT EXISTS errors_group ON errors (service, grouping_key, timestamp);
CREATE INDEX IF NOT EXISTS errors_transaction ON errors (transaction_id);
CREATE INDEX IF NOT EXISTS errors_release ON errors (service, service_version);
CREATE INDEX IF NOT EXISTS errors_trace ON errors (trace_id, timestamp);
CREATE TABLE IF NOT EXISTS error_groups (
    service TEXT NOT NULL,
    grouping_key TEXT NOT NULL,
    type TEXT,
    message TEXT,               -- of the latest occurrence
    culprit TEXT,
    count INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    first_version TEXT,         -- the service version that first sent it
    latest_error_id TEXT NOT NULL,
    assignee_key TEXT,          -- of the latest occurrence that named one
    assignee_name TEXT,
    assignee_email TEXT,
    assignee_commit TEXT,
    assignee_date TEXT,
    status TEXT NOT NULL DEFAULT 'open',  -- open | resolved | ignored
    resolved_at INTEGER,        -- µs since epoch
    resolved_in_version TEXT,   -- the release said to fix it
    regressed_in TEXT,          -- the version of the occurrence that reopened it
    regressed_at INTEGER,
    regressions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (service, grouping_key)
);
CREATE INDEX IF NOT EXISTS error_groups_assignee ON error_groups (assignee_key);
CREATE INDEX IF NOT EXISTS error_groups_release ON error_groups (service, first_version);
CREATE INDEX IF NOT EXISTS error_groups_regressed ON error_groups (service, regressed_in);
CREATE TABLE IF NOT EXISTS metricsets (
    service TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    transaction_name TEXT,
    transaction_type TEXT,
    span_type TEXT,
    span_subtype TEXT,
    tags TEXT,                  -- JSON
    samples TEXT NOT NULL,      -- JSON
    key TEXT                    -- of the whole metricset: one sent again is stored once
);
CREATE INDEX IF NOT EXISTS metricsets_service ON metricsets (service, timestamp);
CREATE UNIQUE INDEX IF NOT EXISTS metricsets_key ON metricsets (key);
-- By time alone, for retention (retention.py) to find the oldest rows of every service;
-- appended to at their end as data arrives, so cheap to keep.
CREATE INDEX IF NOT EXISTS transactions_time ON transactions (timestamp);
CREATE INDEX IF NOT EXISTS spans_time ON spans (timestamp);
CREATE INDEX IF NOT EXISTS errors_time ON errors (timestamp);
CREATE INDEX IF NOT EXISTS metricsets_time ON metricsets (timestamp);
"""



# Time spent in spans per service, minute, type and dependency ('' for none), kept by the
# writer as it stores each span (rows.store_event): the service charts read a few thousand
# of these rows instead of every span.
SPAN_MINUTES = """
CREATE TABLE IF NOT EXISTS span_minutes (
    service TEXT NOT NULL,
    minute INTEGER NOT NULL,    -- µs since epoch, a multiple of 60 s
    type TEXT NOT NULL,
    destination TEXT NOT NULL,  -- spans.destination, '' when NULL
    spans INTEGER NOT NULL,
    duration REAL NOT NULL,     -- ms, summed
    PRIMARY KEY (service, minute, type, destination)
) WITHOUT ROWID
"""
SCHEMA += SPAN_MINUTES + ";\n"

# Transactions per service, name, type, minute and duration bucket (rollup.bucket: 8 per
# doubling), kept by the writer for each transaction it stores (rows.store_event): counts,
# failures and summed durations add up exactly, percentiles come from the buckets. The
# charts and the groups table of a service read these instead of every transaction.
TRANSACTION_MINUTES = """
CREATE TABLE IF NOT EXISTS transaction_minutes (
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    minute INTEGER NOT NULL,    -- µs since epoch, a multiple of 60 s
    bucket INTEGER NOT NULL,    -- rollup.bucket(duration)
    count INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    with_outcome INTEGER NOT NULL,
    duration REAL NOT NULL,     -- ms, summed
    PRIMARY KEY (service, name, type, minute, bucket)
) WITHOUT ROWID
"""
# Time spent in spans as span_minutes, by the name of the span's transaction: a
# transaction name's span charts. A span is added when both it and its transaction are
# stored, whichever comes first (rows.store_event).
TRANSACTION_SPAN_MINUTES = """
CREATE TABLE IF NOT EXISTS transaction_span_minutes (
    service TEXT NOT NULL,      -- the transaction's
    name TEXT NOT NULL,         -- the transaction's
    minute INTEGER NOT NULL,    -- of the span's timestamp
    type TEXT NOT NULL,
    destination TEXT NOT NULL,
    spans INTEGER NOT NULL,
    duration REAL NOT NULL,
    PRIMARY KEY (service, name, minute, type, destination)
) WITHOUT ROWID
"""
SCHEMA += TRANSACTION_MINUTES + ";\n" + TRANSACTION_SPAN_MINUTES + ";\n"

# As rows._failed: the outcome, else an HTTP result's class (1 failure, 0 success, NULL).
_FAILED = """CASE WHEN outcome IN ('success', 'failure') THEN outcome = 'failure'
                  WHEN result LIKE 'HTTP 5%' THEN 1 WHEN result LIKE 'HTTP %' THEN 0 END"""


# Indexes step 5 drops: the pages read the rollups instead, or another index that starts
# with the same columns serves the same queries.
DROPPED_INDEXES = (
    "transactions_stats",        # a service's rows by time: transaction_minutes now
    "transactions_by_name",      # a prefix of transactions_name_time
    "transactions_release",      # a prefix of transactions_release_stats
    "spans_type_time",           # 15 m span charts: span_minutes, in minutes
    "spans_destination_time",    # (nothing reads spans by dependency any more)
)


def fill_rollups(conn: sqlite3.Connection) -> None:
    """Step 5: the rollups of the stored transactions and spans (tables an old database
    may lack are left out: nothing to add up)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "transactions" not in tables:
        return
    conn.create_function("rollup_bucket", 1, rollup.bucket, deterministic=True)
    conn.execute(f"""
        INSERT INTO transaction_minutes
        SELECT service, name, type, timestamp / 60000000 * 60000000, rollup_bucket(duration),
               count(*), ifnull(sum({_FAILED}), 0), count({_FAILED}), sum(duration)
        FROM transactions GROUP BY 1, 2, 3, 4, 5""")
    if "spans" in tables:
        conn.execute("""
            INSERT INTO transaction_span_minutes
            SELECT t.service, t.name, s.timestamp / 60000000 * 60000000, s.type,
                   ifnull(s.destination, ''), count(*), sum(s.duration)
            FROM spans s JOIN transactions t ON t.id = s.transaction_id
            WHERE s.timestamp IS NOT NULL GROUP BY 1, 2, 3, 4, 5""")


class Migration(NamedTuple):
    version: int  # the schema this step brings the database to
    why: str
    statements: tuple[str | Callable[[sqlite3.Connection], None], ...]  # SQL, or a function


# Numbered from 2 (1 is the first schema), one after another, each applied in a transaction
# of its own. Never change a step that was released: add one.
MIGRATIONS: list[Migration] = [
    Migration(2, "a metricset sent again is stored once", (
        "ALTER TABLE metricsets ADD COLUMN key TEXT",
    )),
    Migration(3, "error groups can be resolved and ignored, and regress", (
        "ALTER TABLE error_groups ADD COLUMN status TEXT NOT NULL DEFAULT 'open'",
        "ALTER TABLE error_groups ADD COLUMN resolved_at INTEGER",
        "ALTER TABLE error_groups ADD COLUMN resolved_in_version TEXT",
        "ALTER TABLE error_groups ADD COLUMN regressed_in TEXT",
        "ALTER TABLE error_groups ADD COLUMN regressed_at INTEGER",
        "ALTER TABLE error_groups ADD COLUMN regressions INTEGER NOT NULL DEFAULT 0",
    )),
    Migration(4, "a span's dependency is a column, so charts of it read an index", (
        "ALTER TABLE spans ADD COLUMN destination TEXT",
        # As rows.destination does for new spans (json_valid: a bad row stays NULL).
        """UPDATE spans SET destination = nullif(coalesce(
               json_extract(context, '$.destination.service.resource'),
               json_extract(context, '$.service.target.type') || '/' ||
               json_extract(context, '$.service.target.name')), '')
           WHERE context IS NOT NULL AND json_valid(context)""",
        # the expression index an earlier series.create_indexes made
        "DROP INDEX IF EXISTS spans_dependency",
        SPAN_MINUTES,
        """INSERT INTO span_minutes
           SELECT service, timestamp / 60000000 * 60000000, type, ifnull(destination, ''),
                  count(*), sum(duration)
           FROM spans WHERE timestamp IS NOT NULL GROUP BY 1, 2, 3, 4""",
    )),
    Migration(5, "charts read per-minute transaction rollups; indexes they no longer need go", (
        TRANSACTION_MINUTES, TRANSACTION_SPAN_MINUTES,
        fill_rollups,
        *(f"DROP INDEX IF EXISTS {name}" for name in DROPPED_INDEXES),
    )),
]

SCHEMA_VERSION = MIGRATIONS[-1].version  # PRAGMA user_version of a database made or migrated


def connect(path: str, timeout: float = 1.0) -> sqlite3.Connection:
    """A connection with the settings every user of the database wants."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    """Makes the schema in a new database, or migrates an older one in place; refuses
    (sqlite3.DatabaseError) one made by a newer receiver."""
    # Before the first table (no effect on an existing database): pages that retention
    # frees can be given back to the file system a few at a time (PRAGMA incremental_vacuum).
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable enough for a local dashboard
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"database schema {version} is newer than this receiver's "
                                    f"({SCHEMA_VERSION}); use a newer beatlib or another --db")
    for step in MIGRATIONS if version else ():  # version 0: a new database, made below
        if step.version <= version:
            continue
        with conn:  # each step whole or not at all
            for statement in step.statements:
                if callable(statement):
                    statement(conn)
                else:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={step.version}")
        logger.info("receiver: database migrated to schema %d (%s)", step.version, step.why)
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
