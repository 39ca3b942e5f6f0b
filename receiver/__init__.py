"""runflow-receiver: keeps every Runflow callback and answers what is failing, where and why."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from receiver.settings import Settings, load_settings

if TYPE_CHECKING:
    from receiver.app import create_app

__all__ = ["Settings", "create_app", "load_settings"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The app is imported on first use: the command line must be able to set
    # PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client.
    if name == "create_app":
        from receiver.app import create_app

        return create_app
    raise AttributeError(f"module 'receiver' has no attribute {name!r}")
