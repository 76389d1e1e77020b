"""opsbook: the discipline between Invoke, Ansible, papermill, testinfra, boto3 and Postgres.

The package is layered; imports only point down (import-linter contracts in pyproject.toml):

    opsbook.operations   one module (or package) per thing an operator asks for
    opsbook.engines      reusable machinery and adapters, no knowledge of the operation using it
    opsbook.core         environment (inventory), errors, redaction, facts, paths

Entry points (tasks.py, bench/) sit above all three.
"""

__version__ = "0.1.0"

# Every opsbook command that runs a runbook or writes a record imports nbformat (papermill's notebook
# format), which imports jsonschema, which imports `rfc3987_syntax` when it is installed (jupyter-events
# pulls it in through jsonschema[format-nongpl]) for two format checkers, "iri" and "iri-reference",
# that no notebook schema uses. That package builds some 35 Earley parsers at import time: 1.2 s of
# CPU in every such process on this machine, about 1.5 s of every release and rollback
# (python-jsonschema/jsonschema#1428; its lazy fork, rfc3987-syntax2, is not what jsonschema 4.26
# imports). Marking it absent makes jsonschema leave those two checkers out, exactly as when the
# package is not installed; nothing else in this process is affected. JupyterLab and Ansible run in
# processes of their own and keep it.
import sys as _sys

_sys.modules.setdefault("rfc3987_syntax", None)
del _sys
