import psycopg
import pytest

from opsbook import ROOT
from opsbook.migrations import MigrationError, apply_pending, load_migrations

pytestmark = pytest.mark.postgres


def test_applies_app_schema_once_in_order(pg_db):
    applied = apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None)
    assert applied[0] == "0001_course_events"
    assert apply_pending(pg_db, ROOT / "app" / "migrations", log=lambda _m: None) == []
    with psycopg.connect(pg_db) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    assert {"courses", "course_events", "opsbook_migrations"} <= tables


def test_failed_migration_rolls_back_and_names_itself(pg_db, tmp_path):
    (tmp_path / "0001_ok.yml").write_text("expand:\n  - sql: CREATE TABLE a (x int)\n")
    (tmp_path / "0002_bad.yml").write_text("expand:\n  - sql: CREATE TABLE b (x int)\n  - sql: SELEC 1\n")
    with pytest.raises(MigrationError, match=r"0002_bad .*rolled back"):
        apply_pending(pg_db, tmp_path, log=lambda _m: None)
    with psycopg.connect(pg_db) as conn:
        assert conn.execute("SELECT to_regclass('b')").fetchone()[0] is None
        assert conn.execute("SELECT to_regclass('a')").fetchone()[0] == "a"


def test_malformed_file_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "0001_x.yml").write_text("expand:\n  - drop_everything: yes\n")
    with pytest.raises(MigrationError, match=r"0001_x\.yml: expand step 1"):
        load_migrations(tmp_path)
