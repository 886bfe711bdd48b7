import pytest

from bigmodel.core.settings import Settings


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def service_settings(tmp_path, redis_url, database_url, s3_endpoint, s3_bucket):
    """Settings for the real services (Redis, the ledger database, S3 over HTTP); keyword
    arguments override any field."""

    def make(**overrides) -> Settings:
        fields = {
            "home": tmp_path,
            "broker_url": redis_url,
            "database_url": database_url,
            "storage_url": f"s3://{s3_bucket}/p",
            "s3_endpoint_url": s3_endpoint,
        }
        return Settings(**(fields | overrides))

    return make
