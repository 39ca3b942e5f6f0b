"""What the routes share for the life of the process, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from receiver.settings import Settings


@dataclass
class Resources:
    """The settings and the database engines the routes work with.

    ``read_engine`` serves the query and analytics routes: ``RECEIVER_READ_DATABASE_URL`` (a
    replica, or any read-only connection) when set, else the primary's ``engine``.
    """

    settings: Settings
    engine: AsyncEngine
    read_engine: AsyncEngine | None = None

    @property
    def reader(self) -> AsyncEngine:
        return self.read_engine or self.engine


def resources(request: Request) -> Resources:
    """The process's resources, from the app the request arrived at."""
    res: Resources = request.app.state.resources
    return res
