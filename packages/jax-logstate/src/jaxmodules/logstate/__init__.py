"""Values to log, embedded anywhere in a pytree and read out after a jitted step."""

__all__: list[str] = []
