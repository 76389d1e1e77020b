"""Errors an operator can meet. Each message says what happened, what was left unchanged and
what to do next; tasks turn them into `invoke.exceptions.Exit` with that message."""


class OpsbookError(Exception):
    """An error the operator is meant to read."""
