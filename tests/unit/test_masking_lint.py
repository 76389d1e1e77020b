"""`migrate.lint` checks the masking file against the migrations (no database): every column any
migration creates is decided, no decision names a column no migration creates."""

from __future__ import annotations

import shutil

import pytest

from opsbook.core.paths import APP
from opsbook.engines import masking
from opsbook.operations.migrate import lint_report


@pytest.fixture
def app_copy(tmp_path):
    """A copy of app/migrations and app/masking.yml to break."""
    shutil.copytree(APP / "migrations", tmp_path / "migrations")
    shutil.copy(APP / "masking.yml", tmp_path / "masking.yml")
    return tmp_path


def test_the_apps_masking_file_decides_every_column():
    out = []
    lint_report(out=out.append)
    assert "masking.yml: 12 column(s) decided, 2 masked" in out
    assert "course_events.event_type is dropped by 0003_course_events_kind's contract; its decision stays until " \
           "every database is past it" in out


def test_a_migration_adding_a_column_without_a_decision_fails_migrate_lint(app_copy):
    (app_copy / "migrations" / "0004_nickname.yml").write_text(
        "description: learners' nicknames\nexpand:\n"
        "  - add_column: {table: course_events, column: nickname, type: text}\ncontract: []\n")
    with pytest.raises(masking.MaskingError) as e:
        lint_report(app_copy / "migrations", out=lambda _l: None)
    assert "columns with no decision (mask them or declare them safe with {keep: reason}): " \
           "course_events.nickname (created by 0004_nickname)" in str(e.value)
    assert "Nothing was run" in str(e.value)


def test_a_file_naming_a_column_that_does_not_exist_is_refused_with_the_list(app_copy):
    path = app_copy / "masking.yml"
    path.write_text(path.read_text().replace("\n    student_uuid: hash\n",
                                             "\n    student_uuid: hash\n    stduent_email: fake_email\n"))
    path.write_text(path.read_text() + "  learners:\n    email: fake_email\n")
    with pytest.raises(masking.MaskingError) as e:
        masking.lint(app_copy / "migrations", path)
    assert "columns no migration creates (misspelt, or from a table that is gone): " \
           "course_events.stduent_email, learners.email" in str(e.value)


def test_a_file_leaving_columns_undecided_is_refused_with_the_list(app_copy):
    path = app_copy / "masking.yml"
    text = path.read_text()
    path.write_text(text.replace("\n    student_uuid: hash\n", "\n").replace(
        '    created_at: {keep: "when the course was created"}\n', ""))
    with pytest.raises(masking.MaskingError) as e:
        masking.lint(app_copy / "migrations", path)
    assert "courses.created_at (created by 0001_course_events), course_events.student_uuid (created by " \
           "0002_course_events_student_uuid)" in str(e.value)


@pytest.mark.parametrize(("spec", "says"), [
    ("keep", "keep needs its reason"),
    ("scramble", "unknown rule 'scramble'"),
    ("{jsonb: {student_uuid: hash}}", "jsonb needs `other_keys`"),
    ("{jsonb: {student_uuid: shuffle}, other_keys: x}", "jsonb maps keys to one of"),
], ids=["keep-without-reason", "unknown-rule", "jsonb-without-other-keys", "jsonb-unknown-key-rule"])
def test_a_malformed_decision_is_refused(app_copy, spec, says):
    path = app_copy / "masking.yml"
    path.write_text(path.read_text().replace("\n    student_uuid: hash\n", f"\n    student_uuid: {spec}\n"))
    with pytest.raises(masking.MaskingError, match=says):
        masking.load(path)


def test_no_masking_file_is_refused(app_copy):
    (app_copy / "masking.yml").unlink()
    with pytest.raises(masking.MaskingError, match="no masking file at"):
        masking.lint(app_copy / "migrations")
