"""bigmodel: message-queue driven batch inference.

The core package holds what producers and workers share: the request schema, settings, the
ledger, storage, the model registry and the model runners. Heavy imports (torch, transformers)
live only in ``bigmodel.models`` and are loaded lazily.
"""

__version__ = "0.1.0"
