"""The one exception type of the config layer."""


class ConfigError(ValueError):
    """A config value is invalid. The message names the field path and what is allowed."""

    def __init__(self, path: str, value, allowed: str):
        self.path = path
        self.value = value
        self.allowed = allowed
        super().__init__(f"config field '{path}': got {value!r}; expected {allowed}")
