"""SQL signatures name DB spans: few distinct names, no values, no invented tables."""

from __future__ import annotations

import pytest

from beatlib.instrumentation.sql import signature


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT * FROM items WHERE id = 1", "SELECT FROM items"),
        ("select a, b from public.Items i join authors a on a.id = i.author_id",
         "SELECT FROM public.Items"),
        ('SELECT "x" FROM "My Table"', "SELECT FROM My Table"),
        ("SELECT `a` FROM `shop`.`orders`", "SELECT FROM shop.orders"),
        ("SELECT [a] FROM [dbo].[users]", "SELECT FROM dbo.users"),
        ("SELECT 1", "SELECT"),
        # A derived table: no table is named (the inner one is not what the outer reads).
        ("SELECT count(*) FROM (SELECT id FROM orders WHERE x > 2) AS t", "SELECT"),
        ("SELECT * FROM (SELECT broken", "SELECT"),
        ("SELECT (SELECT max(id) FROM a) AS m FROM b", "SELECT FROM b"),
        ("SELECT 'FROM fake' AS s, x FROM real_table", "SELECT FROM real_table"),
        ("-- FROM comment\nSELECT /* FROM c */ x FROM t", "SELECT FROM t"),
        ("SELECT /* outer /* inner */ FROM not_this */ x FROM items", "SELECT FROM items"),
        ("/* a /* b /* c */ */ */ DELETE FROM jobs", "DELETE FROM jobs"),
        ("SELECT x FROM /* never /* closed */ t", "SELECT"),
        ("SELECT $$FROM nope$$, x FROM t2", "SELECT FROM t2"),
        ("SELECT $tag$ FROM nope $tag$ FROM t3", "SELECT FROM t3"),
        ("SELECT E'it\\'s FROM x' FROM t4", "SELECT FROM t4"),
        ("(SELECT a FROM x) UNION (SELECT a FROM y)", "SELECT FROM x"),
        ("INSERT INTO orders (a, b) VALUES (?, ?)", "INSERT INTO orders"),
        ("insert or replace into kv values (1)", "INSERT INTO kv"),
        ("INSERT IGNORE INTO logs SET a=1", "INSERT INTO logs"),
        ("INSERT DELAYED IGNORE INTO audit.events VALUES (1)", "INSERT INTO audit.events"),
        ("INSERT TOKEN FOR GAME", "INSERT"),  # no INTO: no table is made up from a word
        ("INSERT $1 INTO", "INSERT"),
        ("REPLACE INTO kv VALUES (1)", "REPLACE INTO kv"),
        ("UPDATE users SET name = 'x' WHERE id = 3", "UPDATE users"),
        ("UPDATE ONLY parent SET x = 1", "UPDATE parent"),
        ("DELETE FROM sessions WHERE expires < now()", "DELETE FROM sessions"),
        ("WITH recent AS (SELECT * FROM orders WHERE d > 1) SELECT * FROM recent",
         "SELECT FROM recent"),
        ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM t) SELECT n FROM t",
         "SELECT FROM t"),
        ("WITH a AS (SELECT 1), b AS MATERIALIZED (SELECT 2) UPDATE c SET x = 1", "UPDATE c"),
        ("CALL refresh_stats(1)", "CALL refresh_stats"),
        # DDL: the first keyword only, as Elastic's agents name it.
        ("CREATE TABLE IF NOT EXISTS items (id int)", "CREATE"),
        ("CREATE UNIQUE INDEX ix_a ON a (b)", "CREATE"),
        ("DROP TABLE items", "DROP"),
        ("alter table items add column c int", "ALTER"),
        ("BEGIN", "BEGIN"),
        ("commit", "COMMIT"),
        ("SAVEPOINT sa_1", "SAVEPOINT"),
        ("", ""),
        ("   ", ""),
        ("42", ""),
        ("SELECT 'unterminated FROM x", "SELECT"),
        ("SELECT a FROM", "SELECT"),
        ("INSERT", "INSERT"),
    ],
)  # fmt: skip
def test_signature(sql, expected):
    assert signature(sql) == expected


def test_signature_of_huge_or_hostile_input_is_bounded():
    assert signature("SELECT " + "a, " * 100_000 + "b FROM t") == "SELECT"
    assert signature("SELECT x FROM t WHERE " + "(" * 5000) == "SELECT FROM t"
    assert signature("\x00\udcff SELECT") == ""


def test_signature_cache_is_bounded_by_size():
    import tracemalloc

    from beatlib.instrumentation import sql

    statement = "SELECT a FROM t WHERE x = '%s' " + "AND y = 1 " * 2700  # ~27 KiB each
    tracemalloc.start()
    for n in range(100):
        assert sql.signature(statement % n) == "SELECT FROM t"
    for n in range(40_000):  # short ones: kept, up to the size bound
        sql.signature(f"SELECT {n} FROM t")
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 100 x 27 KiB held would be 2.7 MiB, and 40,000 short statements 2.5 MiB with names
    assert current < 2 * sql.CACHE_CHARS
