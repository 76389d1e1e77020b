"""opsbook: the discipline between Invoke, Ansible, papermill, testinfra, boto3 and Postgres."""

from pathlib import Path

__version__ = "0.1.0"

ROOT = Path(__file__).resolve().parent.parent
