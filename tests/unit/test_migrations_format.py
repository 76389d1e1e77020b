"""The migration format and lint, without a database (squawk is the real binary)."""

from __future__ import annotations

import pytest

from opsbook.core.paths import ROOT
from opsbook.engines.migrations import MigrationError, compile_phase, lint, load_migrations, plan


def write(tmp_path, text, name="0001_x.yml"):
    (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "expand:\n  - add_colum: {table: t}\n",
            r"expand step 1: unknown operation 'add_colum'",
            id="unknown-op",
        ),
        pytest.param(
            "expand:\n  - add_column: {table: t, column: c}\n",
            r"expand step 1: `add_column` is missing type",
            id="missing-arg",
        ),
        pytest.param(
            "expand:\n  - add_column: {table: t, column: c, type: int, size: 3}\n",
            r"`add_column` does not take size",
            id="unknown-arg",
        ),
        pytest.param(
            "expand:\n  - add_column: {table: T-1, column: c, type: int}\n",
            r"`table` must be a lower-case",
            id="bad-identifier",
        ),
        pytest.param(
            "expand:\n  - add_column: {table: t, column: c, type: uuid, default: gen_random_uuid()}\n",
            r"volatile default rewrites",
            id="volatile-default",
        ),
        pytest.param(
            "expand:\n  - add_column: {table: t, column: c, type: int, not_null: true}\n",
            r"NOT NULL column needs a default",
            id="not-null-without-default",
        ),
        pytest.param(
            "expand:\n  - backfill: {table: t, column: c, expression: 1, batch_size: 0}\n",
            r"`batch_size` must be an integer",
            id="bad-batch",
        ),
        pytest.param(
            "expand:\n  - backfill: {table: t, column: c, expression: '1; DROP TABLE t'}\n",
            r"one SQL expression, without `;`",
            id="two-statements",
        ),
        pytest.param(
            "contract:\n  - rename_column: {table: t, column: a, to: b, type: int}\n",
            r"contract step 1: `rename_column` belongs in the expand phase",
            id="rename-in-contract",
        ),
        pytest.param(
            "contract:\n  - drop_column: {table: t, column: a}\n",
            r"non-empty contract needs `contract_requires_version`",
            id="contract-without-version",
        ),
        pytest.param(
            "contract_requires_version: 1.2\ncontract: []\n",
            r"must be a quoted version",
            id="unquoted-version",
        ),
        pytest.param(
            "accept: {prefer-robust-stmts: ''}\n",
            r"`accept` maps squawk rule names to the reason",
            id="accept-without-reason",
        ),
        pytest.param("expand: [\n", r"not valid YAML", id="yaml"),
        pytest.param("expnd: []\n", r"unknown keys \['expnd'\]", id="unknown-key"),
    ],
)
def test_malformed_files_are_refused_naming_file_step_and_problem(tmp_path, text, message):
    write(tmp_path, text)
    with pytest.raises(MigrationError, match=r"0001_x\.yml.*" + message):
        load_migrations(tmp_path)


def test_safe_forms_generated():
    m = {x.id: x for x in load_migrations(ROOT / "app" / "migrations")}
    expand = compile_phase(m["0002_course_events_student_uuid"], "expand")
    assert [s.kind for s in expand] == ["tx", "tx", "backfill", "index"]
    assert "CREATE INDEX CONCURRENTLY IF NOT EXISTS course_events_student_uuid_idx" in expand[3].sql[0]
    contract = compile_phase(m["0002_course_events_student_uuid"], "contract")
    assert contract[0].sql[0].endswith("NOT VALID")
    assert contract[1].kind == "validate"
    rename = compile_phase(m["0003_course_events_kind"], "contract")
    assert [s.kind for s in rename] == ["tx", "validate", "tx", "tx"]
    assert rename[2].sql == (
        "ALTER TABLE course_events ALTER COLUMN kind SET NOT NULL",
        "ALTER TABLE course_events DROP CONSTRAINT IF EXISTS course_events_kind_not_null",
    )
    assert any("DROP COLUMN IF EXISTS event_type" in q for q in rename[3].sql)


def test_the_app_migrations_lint_clean():
    findings = lint(ROOT / "app" / "migrations")
    assert findings
    assert all(f.accepted for f in findings)


def test_raw_sql_that_squawk_flags_stops_unless_the_file_accepts_the_rule(tmp_path):
    write(tmp_path, "expand:\n  - sql: CREATE INDEX t_a ON t (a)\n")
    with pytest.raises(MigrationError, match=r"require-concurrent-index-creation.*NOT accepted"):
        lint(tmp_path)
    write(
        tmp_path,
        "accept:\n  require-concurrent-index-creation: t is created empty in 0000\n"
        "expand:\n  - sql: CREATE INDEX t_a ON t (a)\n",
    )
    found = [f for f in lint(tmp_path) if f.rule == "require-concurrent-index-creation"]
    assert found
    assert found[0].accepted == "t is created empty in 0000"


def test_generated_sql_is_linted_too(tmp_path):
    # A declared check built on a volatile-looking but harmless expression lints clean; a declared
    # column typed `int` is flagged by squawk in the generated ALTER TABLE.
    write(tmp_path, "expand:\n  - add_column: {table: t, column: c, type: int}\n")
    with pytest.raises(MigrationError, match=r"\[add_column t\.c\] prefer-bigint-over-int"):
        lint(tmp_path)


def test_plan_without_a_database_shows_every_step_and_its_sql():
    p = plan(None, ROOT / "app" / "migrations", "contract", {"app1": "1.0.0"})
    assert set(p.refused) == {"0002_course_events_student_uuid", "0003_course_events_kind"}
    text = p.text()
    assert "ALTER TABLE course_events VALIDATE CONSTRAINT course_events_student_uuid_present" in text
    assert "contract gate: REFUSED, blocked by app1: refusing the contract phase (" in text
    assert "0003_course_events_kind needs >= 1.1.0 but app1 serves 1.0.0" in text
