"""mach adapter for the gptoss family; it registers no architecture yet."""

__all__: list[str] = []
