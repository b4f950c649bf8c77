"""Chat-output parsing: reasoning, tool calls and harmony channels in generated text.

Both the adapter contract and the server use it, so it imports nothing from ``mach.decode``,
``mach.io`` or anything above them (``tests/core/test_layering.py`` holds it to that).
"""
