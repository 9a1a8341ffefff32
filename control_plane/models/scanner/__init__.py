"""Model security scanner (`cp-scan`): allowlist-based, never unpickles anything.

`scan_path` scans a file or a model directory into a `ScanReport`; `scan_file` and
`scan_stream` return the findings of one file (local, or any seekable stream such as
an object store reader). `read_safetensors_header` and `read_gguf_header` parse
headers only, for metadata extraction.
"""

from __future__ import annotations

from control_plane.models.scanner._io import ModelFormatError, Reader, ScanLimits
from control_plane.models.scanner.gguf_header import (
    GGUFArray,
    GGUFTensorInfo,
    GGUFValue,
    read_gguf_header,
)
from control_plane.models.scanner.pickles import scan_pickle
from control_plane.models.scanner.policy import classify_global
from control_plane.models.scanner.safetensors_header import TensorEntry, read_safetensors_header
from control_plane.models.scanner.scan import (
    PICKLE_EXTENSIONS,
    scan_file,
    scan_path,
    scan_stream,
    verdict_for,
)
from control_plane.models.scanner.version import SCANNER_NAME, SCANNER_VERSION

__all__ = [
    "PICKLE_EXTENSIONS",
    "SCANNER_NAME",
    "SCANNER_VERSION",
    "GGUFArray",
    "GGUFTensorInfo",
    "GGUFValue",
    "ModelFormatError",
    "Reader",
    "ScanLimits",
    "TensorEntry",
    "classify_global",
    "read_gguf_header",
    "read_safetensors_header",
    "scan_file",
    "scan_path",
    "scan_pickle",
    "scan_stream",
    "verdict_for",
]
