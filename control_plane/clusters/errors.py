"""Errors of the clusters domain."""

from __future__ import annotations

from control_plane.core.errors import ControlPlaneError


class UnusableCredential(ControlPlaneError):
    """The request names a credential that cannot describe this cluster (wrong provider,
    not tenant-wide, or a kubeconfig without a usable context). Rendered like every other
    request validation failure."""

    status = 422
    code = "validation"
    title = "Request validation failed"
