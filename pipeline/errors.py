"""The one exception type a user can cause; its message names the config key to change."""


class PipelineError(Exception):
    """A problem with the user's input or environment, reported as one line.

    Args:
        message: what is wrong, in one sentence.
        key: the config key to change (e.g. ``target.indices``), or None.
    """

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        self.message = message
        super().__init__(f"{message} (config key: {key})" if key else message)

    def __reduce__(self):  # keeps the key when a Dask worker sends the error back
        return type(self), (self.message, self.key)
