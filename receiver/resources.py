"""What the routes share for the life of the process, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from receiver.settings import Settings


@dataclass
class Resources:
    """The settings and the database engine every route works with."""

    settings: Settings
    engine: AsyncEngine


def resources(request: Request) -> Resources:
    """The process's resources, from the app the request arrived at."""
    res: Resources = request.app.state.resources
    return res
