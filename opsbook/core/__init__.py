"""Core: what every layer reads (the environment, errors, redaction, facts, paths). Imports nothing
above it."""
