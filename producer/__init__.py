"""The submission and query side: a Python API (`producer.api.Client`) and the `bigmodel` CLI."""

from producer.api import Client

__all__ = ["Client"]
