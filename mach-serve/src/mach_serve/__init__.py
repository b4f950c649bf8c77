"""mach-serve: mach's OpenAI-compatible HTTP server."""

from mach_serve.app import create_app
from mach_serve.limits import HTTPLimits
from mach_serve.server import build_state, make_server, run

__all__ = ["HTTPLimits", "build_state", "create_app", "make_server", "run"]
