"""The core's error types: each message is for a person.

The API maps them to HTTP statuses (`service.api.errors`); offline users catch them directly.
"""


class BundleError(RuntimeError):
    """The bundle is missing, tampered with, unsigned where a signature is required, or incompatible."""
