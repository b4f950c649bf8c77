"""mach adapter for the gemma family; it registers no architecture yet."""

__all__: list[str] = []
