"""mach-serve: the OpenAI-compatible HTTP server; it adds no command yet."""

__all__: list[str] = []
