"""The one exception family of a training run.

Every error a user can cause (bad data, settings that disagree with a resumed run, missing
weights, a failed export or download) is a `RunError` whose message is for people:
`python -m training` prints it as `error: ...` and exits with code 2, without a traceback.
Imports nothing heavy, so the command line can catch these before torch is loaded.
"""


class RunError(Exception):
    """A training run cannot go on; the message says why and what to do."""


class DataError(RunError):
    """Bad input data; the message names the file (and row) and what is wrong."""


class ConfigMismatch(RunError):
    """The run directory and the command disagree (settings, or stages run out of order)."""


class WeightsError(RunError):
    """Pretrained weights cannot be had (offline, wrong file)."""


class ExportError(RunError):
    """The exported ONNX graph does not reproduce torch's numbers."""


class DownloadError(RunError):
    """A dataset download failed or did not match its checksum."""
