"""Engines and adapters: reusable machinery (Ansible runner, database access, migration engine,
lock, probe, record store and runbook runner, lab, fleet, artifact). No engine knows which
operation uses it; engines import only each other and opsbook.core."""
