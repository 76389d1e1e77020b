"""opsbook: the discipline between Invoke, Ansible, papermill, testinfra, boto3 and Postgres.

The package is layered; imports only point down (import-linter contracts in pyproject.toml):

    opsbook.operations   one module (or package) per thing an operator asks for
    opsbook.engines      reusable machinery and adapters, no knowledge of the operation using it
    opsbook.core         environment (inventory), errors, redaction, facts, paths

Entry points (tasks.py, bench/) sit above all three.
"""

__version__ = "0.1.0"
