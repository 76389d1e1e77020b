"""What a refresh's record keeps of masking's progress: one `n/total rows masked` line every so often,
a table's last one, and every other line (indexes dropped and built again, the summary)."""

from __future__ import annotations

from opsbook.operations.staging_refresh import every


def test_progress_lines_are_thinned_but_nothing_else_is(monkeypatch):
    import opsbook.operations.staging_refresh as sr

    now = [100.0]
    monkeypatch.setattr(sr.time, "monotonic", lambda: now[0])
    kept: list[str] = []
    say = every(10, kept.append)
    say("course_events: 3 index(es) dropped while it is masked, built again after it: a, b, c")
    for n in range(1, 6):
        say(f"course_events: {n * 100:,}/500 rows masked")
        now[0] += 4
    say("course_events: 3 index(es) built again in 1.2 s")
    say("masked 500 row(s) in 1 table(s), 5 batch(es), 20.0 s (25 rows/s)")
    assert kept == [
        "course_events: 3 index(es) dropped while it is masked, built again after it: a, b, c",
        "course_events: 100/500 rows masked",
        "course_events: 400/500 rows masked",
        "course_events: 500/500 rows masked",
        "course_events: 3 index(es) built again in 1.2 s",
        "masked 500 row(s) in 1 table(s), 5 batch(es), 20.0 s (25 rows/s)",
    ]
