"""Release history from the ledger: the four delivery figures, per environment.

- release frequency: succeeded releases per week;
- lead time: from the released commit (`commit_time` figure of a release record) to the end
  of the release;
- change failure rate: releases that failed, or that a rollback followed before the next
  release, over all releases;
- time to restore: from the end of such a failed change to the end of the next succeeded
  rollback or release in the same environment.

Which entries are releases and which are rollbacks is read through `opsbook.engines.records.ledger`.
"""

from __future__ import annotations

from typing import Any

from opsbook.engines.records.ledger import RELEASE, ROLLBACK, kind

COLUMNS = ["env", "id", "start", "end", "outcome", "lead_time_h", "failed_change", "restored_at",
           "time_to_restore_h"]


def _ts(value):
    import pandas as pd

    if value in (None, ""):
        return pd.NaT
    return pd.to_datetime(value, utc=True, errors="coerce")


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
        for i, e in enumerate(items):
            if e["runbook"] != RELEASE:
                continue
            end = _ts(e.get("end"))
            commit = _ts((e.get("figures") or {}).get("commit_time"))
            later = items[i + 1 :]
            next_release = next((x for x in later if x["runbook"] == RELEASE), None)
            rolled_back = any(
                x["runbook"] == ROLLBACK and (next_release is None or x["start"] < next_release["start"])
                for x in later
            )
            failed = e.get("outcome") != "succeeded" or rolled_back
            restored = pd.NaT
            if failed:
                fix = next((x for x in later if x.get("outcome") == "succeeded"), None)
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
