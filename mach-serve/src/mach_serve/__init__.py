"""mach-serve: mach's OpenAI-compatible HTTP server."""

from mach_serve.app import create_app
from mach_serve.server import build_state, run

__all__ = ["build_state", "create_app", "run"]
