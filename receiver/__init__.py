"""runflow-receiver: keeps every Runflow callback and answers what is failing, where and why."""

from receiver.app import create_app
from receiver.settings import Settings, load_settings

__all__ = ["Settings", "create_app", "load_settings"]
__version__ = "0.1.0"
