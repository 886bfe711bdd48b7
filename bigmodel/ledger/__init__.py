"""The ledger: SQLAlchemy models and the repository producers and workers share."""
