"""The core's error types: each message is for a person.

The API maps them to HTTP statuses (`service.api.errors`); offline users catch them directly. The
modules that raise them import them from here (and re-export them, so `from service.core.preprocess
import ImageError` keeps working).
"""


class BundleError(RuntimeError):
    """The bundle is missing, tampered with, unsigned where a signature is required, or incompatible."""


class ImageError(ValueError):
    """The bytes are not an image this system accepts; the message says why, for a person."""


class UnsupportedImageError(ImageError):
    """A readable image in a format other than JPEG or PNG."""


class ImageTooLargeError(ImageError):
    """More pixels than the configured limit."""


class ImageShapeError(ImageError):
    """Too small, or an aspect ratio no photograph of a lesion has."""


class MetadataError(ValueError):
    """The metadata cannot be used; the message says why, for a person."""


class PriorError(ValueError):
    """A prior a caller gave cannot be used; the message says why."""


class LesionIdsError(ValueError):
    """A request's lesion ids cannot be read; the message says why."""
