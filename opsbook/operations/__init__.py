"""Operations: one module (or package) per thing an operator asks for (release and rollback,
migrate, provision, status, env report, records). Each runs a runbook or leaves a record, reuses
the engines and never imports another operation."""
