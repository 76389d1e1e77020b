import psycopg
import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import MigrationError, apply_pending, load_migrations

pytestmark = pytest.mark.postgres


def test_applies_app_schema_once_in_order(pg_db):
    applied = apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    assert applied[0] == "0001_course_events"
    assert apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None) == []
    with psycopg.connect(pg_db) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    assert {"courses", "course_events", "opsbook_migrations"} <= tables


def test_sql_that_squawk_cannot_parse_is_refused_before_anything_runs(pg_db, tmp_path):
    (tmp_path / "0001_ok.yml").write_text("expand:\n  - sql: CREATE TABLE a (x bigint)\n")
    (tmp_path / "0002_bad.yml").write_text("expand:\n  - sql: CREATE TABLE b (x bigint)\n  - sql: SELEC 1\n")
    with pytest.raises(
        MigrationError, match=r"(?s)0002_bad expand \[sql step 2\] syntax-error.*Nothing was run"
    ):
        apply_pending(pg_db, tmp_path, log=lambda _m: None)
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT to_regclass('a')").fetchone()[0] is None
        assert conn.execute("SELECT to_regclass('b')").fetchone()[0] is None


def test_failed_step_rolls_back_and_names_itself(pg_db, tmp_path):
    (tmp_path / "0001_ok.yml").write_text("expand:\n  - sql: CREATE TABLE a (x bigint)\n")
    (tmp_path / "0002_bad.yml").write_text(
        "expand:\n  - sql: CREATE TABLE b (x bigint)\n  - sql: INSERT INTO b VALUES (1); INSERT INTO "
        "nowhere VALUES (1)\n"
    )
    with pytest.raises(
        MigrationError, match=r"(?s)0002_bad \(expand\) stopped at step 2 'sql step 2'.*rolled back"
    ):
        apply_pending(pg_db, tmp_path, log=lambda _m: None)
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT to_regclass('a')").fetchone()[0] == "a"
        assert conn.execute("SELECT count(*) FROM b").fetchone()[0] == 0  # step 2's first insert rolled back
        steps = conn.execute("SELECT migration, step FROM opsbook_migration_steps ORDER BY 1, 2").fetchall()
    assert steps == [("0001_ok", 1), ("0002_bad", 1)]
    # Fixed, the rerun continues with step 2 (step 1 is not repeated: CREATE TABLE b would fail).
    (tmp_path / "0002_bad.yml").write_text(
        "expand:\n  - sql: CREATE TABLE b (x bigint)\n  - sql: INSERT INTO b VALUES (1)\n"
    )
    assert apply_pending(pg_db, tmp_path, log=lambda _m: None) == ["0002_bad"]
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT count(*) FROM b").fetchone()[0] == 1
    # Changing a step that already ran is refused: the database no longer matches the file.
    (tmp_path / "0003_more.yml").write_text(
        "expand:\n  - sql: CREATE TABLE c (x bigint)\n  - sql: SELECT nope\n"
    )
    with pytest.raises(MigrationError):
        apply_pending(pg_db, tmp_path, log=lambda _m: None)
    (tmp_path / "0003_more.yml").write_text(
        "expand:\n  - sql: CREATE TABLE c (y bigint)\n  - sql: SELECT 1\n"
    )
    with pytest.raises(MigrationError, match=r"step 1 'sql step 1' was applied with different SQL"):
        apply_pending(pg_db, tmp_path, log=lambda _m: None)


def test_malformed_file_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "0001_x.yml").write_text("expand:\n  - drop_everything: yes\n")
    with pytest.raises(
        MigrationError, match=r"0001_x\.yml: expand step 1: unknown operation 'drop_everything'"
    ):
        load_migrations(tmp_path)
