"""Database hosts: Postgres running, reachable only as pg_hba allows."""

testinfra_hosts = ["ansible://db"]


def test_postgres_running_and_enabled(host):
    svc = host.service("postgresql@15-main")
    assert svc.is_running
    assert svc.is_enabled


def test_listens_on_5432(host):
    assert host.socket("tcp://0.0.0.0:5432").is_listening


def test_no_http_service_here(host):
    assert not host.socket("tcp://0.0.0.0:80").is_listening
    assert not host.socket("tcp://0.0.0.0:8000").is_listening


def test_pg_hba_allows_the_service_role_from_app_hosts_only(host, hostvars, inventory):
    hba = host.file("/etc/postgresql/15/main/pg_hba.conf")
    assert hba.mode == 0o640
    lines = [line.split() for line in hba.content_string.splitlines() if line.strip() and not line.startswith("#")]
    service_sources = {f[3] for f in lines if f[0] == "host" and f[2] == hostvars["bl_api_db_user"]}
    app_addresses = {f"{h.address}/32" for h in inventory.hosts("app")}
    assert service_sources == app_addresses
    assert not any(f[0] == "host" and f[1] == "all" and f[2] == "all" for f in lines)


def test_service_database_exists(host, hostvars):
    with host.sudo("postgres"):
        out = host.check_output("psql -Atc \"SELECT datname FROM pg_database WHERE datname = '%s'\"",
                                hostvars["bl_api_db_name"])
    assert out == hostvars["bl_api_db_name"]
