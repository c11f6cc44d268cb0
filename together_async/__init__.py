"""together_async: a fully async client for Together's Batch API.

Everything a user needs is importable from here; the modules behind it are private.
"""

from __future__ import annotations

import logging as _logging

from ._client import AsyncTogether
from ._config import ClientConfig
from ._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchFileError,
    BatchNotFinishedError,
    ClientClosedError,
    ConflictError,
    InternalServerError,
    InvalidArgumentError,
    ManifestMismatchError,
    MissingAPIKeyError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseTooLargeError,
    StatusPollError,
    TogetherError,
    UnprocessableEntityError,
    UnsafeURLError,
    WaitTimeoutError,
)
from ._jsonl import (
    BatchFileProblem,
    BatchFileReport,
    BatchFileValidator,
    check_batch_file,
    validate_batch_file,
)
from ._models import (
    BatchEndpoint,
    BatchJob,
    BatchJobStatus,
    BatchRequest,
    BatchResult,
    DownloadedFile,
    Endpoint,
    EndpointPath,
    FileDeleteResponse,
    FileList,
    FileObject,
    FilePurpose,
)
from .gather import BatchRun, BatchRunSummary, gather_batches, stream_batches
from .progress import BatchesProgressBar, BatchProgressBar
from .watch import BatchWatcher

__version__ = "0.1.0"

# A library leaves logging to the application: without this, Python's last-resort handler
# would print the library's warnings to the stderr of a program that configured none.
_logging.getLogger("together_async").addHandler(_logging.NullHandler())

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncTogether",
    "AuthenticationError",
    "BadRequestError",
    "BatchEndpoint",
    "BatchFileError",
    "BatchFileProblem",
    "BatchFileReport",
    "BatchFileValidator",
    "BatchJob",
    "BatchJobStatus",
    "BatchNotFinishedError",
    "BatchProgressBar",
    "BatchRequest",
    "BatchResult",
    "BatchRun",
    "BatchRunSummary",
    "BatchWatcher",
    "BatchesProgressBar",
    "ClientClosedError",
    "ClientConfig",
    "ConflictError",
    "DownloadedFile",
    "Endpoint",
    "EndpointPath",
    "FileDeleteResponse",
    "FileList",
    "FileObject",
    "FilePurpose",
    "InternalServerError",
    "InvalidArgumentError",
    "ManifestMismatchError",
    "MissingAPIKeyError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseTooLargeError",
    "StatusPollError",
    "TogetherError",
    "UnprocessableEntityError",
    "UnsafeURLError",
    "WaitTimeoutError",
    "__version__",
    "check_batch_file",
    "gather_batches",
    "stream_batches",
    "validate_batch_file",
]
