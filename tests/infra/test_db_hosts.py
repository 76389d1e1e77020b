"""Database hosts: Postgres running, reachable only as pg_hba allows.

A host with postgres_serving: clones (lab-staging's clone host) runs no cluster of its own: the clone
staging refresh switched in serves on the port, under the pg_hba.conf the role wrote for it, and
Debian's cluster must stay stopped (it would take the port). Before a first refresh nothing listens,
and these checks say so (a release there would have no database).

The cluster (postgres_version, postgres_cluster: group_vars/db/), the port, database and service
role (bl_api_db_port, bl_api_db_name, bl_api_db_user) and the ports that must stay closed
(lb_http_port, bl_api_port: group_vars/all/) come from the inventory."""

testinfra_hosts = ["ansible://db"]


def _cluster(hostvars):
    """(systemd unit, config directory) of the cluster, in Debian's layout as the postgres role uses it."""
    version, cluster = hostvars["postgres_version"], hostvars["postgres_cluster"]
    return f"postgresql@{version}-{cluster}", f"/etc/postgresql/{version}/{cluster}"


def _clones(hostvars) -> bool:
    return hostvars["postgres_serving"] == "clones"


def test_postgres_running_and_enabled(host, hostvars):
    svc = host.service(_cluster(hostvars)[0])
    if _clones(hostvars):
        assert not svc.is_running, "Debian's own cluster runs on a clone host: it would take the clones' port"
        return
    assert svc.is_running
    assert svc.is_enabled


def test_listens_on_its_port(host, hostvars):
    assert host.socket(f"tcp://0.0.0.0:{hostvars['bl_api_db_port']}").is_listening, (
        "no clone serves here yet: run `invoke staging.refresh` for this environment" if _clones(hostvars) else
        "Postgres does not listen on its port")


def test_no_http_service_here(host, hostvars):
    assert not host.socket(f"tcp://0.0.0.0:{hostvars['lb_http_port']}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{hostvars['bl_api_port']}").is_listening


def test_pg_hba_allows_the_service_role_from_app_hosts_only(host, hostvars, inventory):
    path = hostvars["postgres_clones_hba_file"] if _clones(hostvars) else f"{_cluster(hostvars)[1]}/pg_hba.conf"
    hba = host.file(path)
    assert hba.mode == 0o640
    lines = [line.split() for line in hba.content_string.splitlines() if line.strip() and not line.startswith("#")]
    service_sources = {f[3] for f in lines if f[0] == "host" and f[2] == hostvars["bl_api_db_user"]}
    app_addresses = {f"{h.address}/32" for h in inventory.hosts("app")}
    assert service_sources == app_addresses
    assert not any(f[0] == "host" and f[1] == "all" and f[2] == "all" for f in lines)


def test_service_database_exists(host, hostvars):
    if _clones(hostvars):
        return   # the refresh checks it through the service's own role (staging_refresh: switch)
    with host.sudo("postgres"):
        out = host.check_output(
            "psql -Atc \"SELECT datname FROM pg_database WHERE datname = '%s'\"", hostvars["bl_api_db_name"]
        )
    assert out == hostvars["bl_api_db_name"]


def test_wal_archiving_where_it_is_on_has_not_failed_since_it_last_worked(host, hostvars):
    """A cluster that archives its WAL (postgres_backup: pgbackrest) must be archiving: a failing
    archive_command keeps every WAL segment in pg_wal until the disk is full, and no backup taken
    since can be restored past its end."""
    if _clones(hostvars):
        return   # clones never archive (archive_mode off: they must not push WAL into the source's archive)
    with host.sudo("postgres"):
        mode, healthy, last_ok, last_failed, failed_wal = host.check_output(
            "psql -AtF '|' -c \"SELECT current_setting('archive_mode'), "
            "coalesce(last_failed_time < last_archived_time, last_failed_time IS NULL), "
            "coalesce(last_archived_time::text, 'never'), coalesce(last_failed_time::text, ''), "
            "coalesce(last_failed_wal, '') FROM pg_stat_archiver\"").split("|")
    if mode == "off":
        return
    assert healthy == "t", (
        f"WAL archiving fails: segment {failed_wal} failed at {last_failed}, the last success was {last_ok}; see "
        f"/var/log/pgbackrest/ and `pgbackrest --stanza=main check` on this host")


def test_a_repository_kept_here_for_another_host_answers(host):
    """A host that keeps another database host's pgBackRest repository (its /etc/pgbackrest.conf names
    that host as pg1-host: the lab's db2 for db1) must be able to read it: the stanza is there and
    pgBackRest reports it ok. (That its cluster's WAL arrives is the check above, on the database host.)"""
    import json

    from opsbook.engines.snapshots.pgbackrest import STANZA_USABLE

    conf = host.file("/etc/pgbackrest.conf")
    if not conf.exists:
        return
    with host.sudo():
        text = conf.content_string
    stanzas = [line.strip()[1:-1] for line in text.splitlines() if line.strip().startswith("[")]
    if not any(line.strip().startswith("pg1-host=") for line in text.splitlines()):
        return   # the repository (if any) is the cluster's own, on this host
    with host.sudo("postgres"):
        out = host.run("pgbackrest --output=json info")
    assert out.rc == 0, f"pgbackrest info fails on this repository host: {out.stderr.strip()[-500:]}"
    status = {s["name"]: s["status"] for s in json.loads(out.stdout)}
    for stanza in (s for s in stanzas if s.split(":")[0] != "global"):   # [global], [global:archive-push]
        assert stanza in status, (f"stanza {stanza} is not in the repository here: converge this host and its "
                                  f"database host")
        # "no valid backups" (2) is a readable stanza that holds no backup yet: a new lab's, before its
        # first `invoke snapshot` (the release's safety point asks for a backup where the inventory says so)
        assert status[stanza]["code"] in STANZA_USABLE, f"stanza {stanza}: {status[stanza]['message']}"
