"""Delivery figures from the ledger, per environment: the one implementation that
`notebooks/release_history.ipynb` and the records site (`invoke records.site`) both draw.

- release frequency: succeeded releases per week (per day over a window);
- lead time: from the released commit (`commit_time` figure of a release record) to the end
  of the release;
- change failure rate: releases that failed, or that a rollback followed before the next
  release, over all releases;
- time to restore: from the end of such a failed change to the end of the next succeeded
  rollback or release in the same environment.

Which entries are releases and which are rollbacks is read through `opsbook.engines.records.ledger`.
:func:`window` and :func:`daily` give the same figures over the last N days (7 and 30 on the site):
a release counts on the day it ended (UTC), and a window is N whole days ending with today.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from opsbook.engines.records.ledger import RELEASE, ROLLBACK, kind

COLUMNS = ["env", "id", "start", "end", "outcome", "lead_time_h", "failed_change", "restored_at",
           "time_to_restore_h"]


def _ts(value):
    import pandas as pd

    if value in (None, ""):
        return pd.NaT
    try:  # the ledger's own ISO form: read directly (pandas guessing each value's format is 100x slower)
        when = datetime.fromisoformat(str(value))
    except ValueError:
        return pd.to_datetime(value, utc=True, errors="coerce")
    return pd.Timestamp(when if when.tzinfo else when.replace(tzinfo=UTC)).tz_convert("UTC")


def releases(entries: list[dict[str, Any]]):
    """One row per release with its lead time, whether it was a failed change, and time to restore."""
    import pandas as pd

    rows = []
    by_env: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        if kind(e) in (RELEASE, ROLLBACK):
            by_env.setdefault(e.get("env", "?"), []).append({**e, "runbook": kind(e)})
    for env, items in sorted(by_env.items()):
        items.sort(key=lambda e: e.get("start", ""))
        release_at = [i for i, e in enumerate(items) if e["runbook"] == RELEASE]
        for n, i in enumerate(release_at):
            e = items[i]
            end = _ts(e.get("end"))
            commit = _ts((e.get("figures") or {}).get("commit_time"))
            # Items are in start order: the rollbacks before the next release lie between the two.
            j = release_at[n + 1] if n + 1 < len(release_at) else len(items)
            next_start = items[j]["start"] if j < len(items) else None
            rolled_back = any(
                x["runbook"] == ROLLBACK and (next_start is None or x["start"] < next_start)
                for x in items[i + 1 : j]
            )
            failed = e.get("outcome") != "succeeded" or rolled_back
            restored = pd.NaT
            if failed:
                fix = next((x for x in items[i + 1 :] if x.get("outcome") == "succeeded"), None)
                restored = _ts(fix["end"]) if fix else pd.NaT
            rows.append({
                "env": env,
                "id": e["id"],
                "start": _ts(e.get("start")),
                "end": end,
                "outcome": e.get("outcome"),
                "lead_time_h": (end - commit).total_seconds() / 3600 if pd.notna(commit) else None,
                "failed_change": failed,
                "restored_at": restored,
                "time_to_restore_h": (restored - end).total_seconds() / 3600 if pd.notna(restored) else None,
            })
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("lead_time_h", "time_to_restore_h"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["failed_change"] = df["failed_change"].astype(bool)
    return df


def summary(df):
    """Per environment: releases, releases per week, median lead time, change failure rate, median restore."""
    import pandas as pd

    out = []
    for env, g in df.groupby("env", sort=True):
        succeeded = g[g["outcome"] == "succeeded"]
        span_weeks = max((g["end"].max() - g["start"].min()).total_seconds() / (7 * 86400), 1.0)
        out.append({
            "env": env,
            "releases": len(g),
            "releases_per_week": round(len(succeeded) / span_weeks, 2),
            "median_lead_time_h": g["lead_time_h"].median(),
            "change_failure_rate": round(float(g["failed_change"].mean()), 3),
            "median_time_to_restore_h": g["time_to_restore_h"].median(),
            "unrestored": int((g["failed_change"] & g["restored_at"].isna()).sum()),
        })
    return pd.DataFrame(out, columns=["env", "releases", "releases_per_week", "median_lead_time_h",
                                      "change_failure_rate", "median_time_to_restore_h", "unrestored"])


def plot(df):
    """Four panels per environment: weekly releases, lead time, failure rate, time to restore."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    (freq, lead), (cfr, ttr) = axes
    for env, g in df.groupby("env", sort=True):
        ok = g[g["outcome"] == "succeeded"].set_index("end")
        weekly = ok["id"].resample("W").count() if len(ok) else ok["id"]
        freq.plot(weekly.index, weekly.values, marker="o", label=env)
        with_lead = g.dropna(subset=["lead_time_h"])
        lead.plot(with_lead["end"], with_lead["lead_time_h"], marker="o", linestyle="", label=env)
        rate = g.set_index("end")["failed_change"].astype(float).expanding().mean()
        cfr.plot(rate.index, rate.values, label=env)
        restored = g.dropna(subset=["time_to_restore_h"])
        ttr.plot(restored["end"], restored["time_to_restore_h"], marker="o", linestyle="", label=env)
    for ax, title, unit in (
        (freq, "Release frequency (succeeded releases per week)", "releases"),
        (lead, "Lead time: commit to release", "hours"),
        (cfr, "Change failure rate (cumulative)", "fraction of releases"),
        (ttr, "Time to restore after a failed change", "hours"),
    ):
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelrotation=30)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


WINDOW_DAYS = (7, 30)
FIGURES = (  # name, what it is, unit: the four delivery figures as the site and the notebook show them
    ("deployments", "Deployment frequency: succeeded releases", "releases"),
    ("lead_time_h", "Lead time for changes: commit to serving (median)", "hours"),
    ("change_failure_rate", "Change failure rate: releases failed or rolled back", "fraction"),
    ("time_to_restore_h", "Time to restore after a failed change (median)", "hours"),
)


def _today(now: datetime | None) -> date:
    return (now or datetime.now(UTC)).astimezone(UTC).date()


def _in_days(df, first: date, last: date):
    if not len(df):
        return df
    days = df["end"].dt.date
    return df[(days >= first) & (days <= last)]


def _figures(g, days: int) -> dict[str, Any]:
    """The four figures of the releases in `g` (rows of :func:`releases`), over `days` days."""
    succeeded = int((g["outcome"] == "succeeded").sum())
    lead = g["lead_time_h"].dropna()
    restore = g["time_to_restore_h"].dropna()
    return {
        "releases": len(g),
        "deployments": succeeded,
        "deployments_per_day": round(succeeded / days, 3),
        "lead_time_h": round(float(lead.median()), 3) if len(lead) else None,
        "change_failure_rate": round(float(g["failed_change"].mean()), 3) if len(g) else None,
        "time_to_restore_h": round(float(restore.median()), 3) if len(restore) else None,
        "unrestored": int((g["failed_change"] & g["restored_at"].isna()).sum()),
    }


def window(df, days: int, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Per environment, the figures of the releases that ended in the last `days` whole days (today
    included): releases, deployments (succeeded) and per day, median lead time, change failure rate,
    median time to restore, failed changes not restored yet. An environment with no release in the
    window has zero deployments and None for the figures that need a release."""
    last = _today(now)
    first = last - timedelta(days=days - 1)
    return {str(env): _figures(_in_days(g, first, last), days) for env, g in df.groupby("env", sort=True)}


def windows(df, now: datetime | None = None, days: tuple[int, ...] = WINDOW_DAYS):
    """:func:`window` for each length, as one table (env, days, figures...)."""
    import pandas as pd

    rows = [{"env": env, "days": n, **figs} for n in days for env, figs in window(df, n, now).items()]
    return pd.DataFrame(rows, columns=["env", "days", "releases", "deployments", "deployments_per_day",
                                       "lead_time_h", "change_failure_rate", "time_to_restore_h", "unrestored"])


def daily(df, env: str, days: int, now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per day of the last `days` (oldest first) for one environment: the day (ISO) and
    the four figures of the releases that ended that day (what the charts draw)."""
    g = df[df["env"] == env]
    last = _today(now)
    out = []
    for i in range(days - 1, -1, -1):
        day = last - timedelta(days=i)
        figs = _figures(_in_days(g, day, day), 1)
        out.append({"day": day.isoformat(), **{name: figs[name] for name, _, _ in FIGURES}})
    return out
