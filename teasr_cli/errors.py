"""User-facing errors: the CLI prints `str(err)` on one line and exits non-zero."""


class TeasrError(Exception):
    """Base class for every error the user should see as one clear line."""


class ImageReadError(TeasrError):
    """An input image is missing, unreadable, corrupt, empty or too large."""


class ImageWriteError(TeasrError):
    """An output image cannot be written (bad folder, would overwrite the input, ...)."""


class ModelError(TeasrError):
    """A model cannot be found, downloaded or loaded."""
