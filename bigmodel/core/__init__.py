"""Pure core: no Celery, Redis, SQLAlchemy, boto3 or torch imported here."""
