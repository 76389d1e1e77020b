"""What a refresh's record keeps of masking's progress: one `n/total rows masked` line every so often,
a table's last one, and every other line (indexes dropped and built again, the summary)."""

from __future__ import annotations

from opsbook.engines import masking


def test_progress_lines_are_thinned_but_nothing_else_is(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(masking.time, "monotonic", lambda: now[0])
    kept: list[str] = []
    # One table's shared state, as apply makes it, saying its counts at most every 10 s.
    job = masking._TableJob("course_events", [], [], [], {}, b"", 100, 500, kept.append, masking.ApplyResult(),
                            progress_every=10)
    kept.append("course_events: 3 index(es) dropped while it is masked, built again after it: a, b, c")
    for _ in range(1, 6):
        job.masked(100)
        now[0] += 4
    kept.append("course_events: 3 index(es) built again in 1.2 s")
    kept.append("masked 500 row(s) in 1 table(s), 5 batch(es), 20.0 s (25 rows/s)")
    assert kept == [
        "course_events: 3 index(es) dropped while it is masked, built again after it: a, b, c",
        "course_events: 100/500 rows masked",
        "course_events: 400/500 rows masked",
        "course_events: 500/500 rows masked",
        "course_events: 3 index(es) built again in 1.2 s",
        "masked 500 row(s) in 1 table(s), 5 batch(es), 20.0 s (25 rows/s)",
    ]
    assert job.result.batches == 5
