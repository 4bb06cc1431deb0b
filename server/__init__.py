"""agent-runtime's HTTP server: the hosted agent API of DESIGN.md over a Runtime."""

from ._app import create_app as create_app

__all__ = ["create_app"]
