"""mach adapter for the deepseek family; it registers no architecture yet."""

__all__: list[str] = []
