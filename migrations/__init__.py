"""Alembic migrations for the ledger (applied by `bigmodel db upgrade`)."""
