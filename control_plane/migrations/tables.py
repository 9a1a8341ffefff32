"""Imports every table module so `metadata` is complete for migrations and tests."""

from control_plane.audit import tables as audit
from control_plane.clusters import tables as clusters
from control_plane.credentials import tables as credentials
from control_plane.endpoints import tables as endpoints
from control_plane.identity import tables as identity
from control_plane.models import tables as models
from control_plane.routing import tables as routing
from control_plane.usage import tables as usage
from control_plane.workflow_runs import tables as workflow_runs

__all__ = [
    "audit",
    "clusters",
    "credentials",
    "endpoints",
    "identity",
    "models",
    "routing",
    "usage",
    "workflow_runs",
]
