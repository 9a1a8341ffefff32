"""Imports every table module so `metadata` is complete for migrations and tests."""

from control_plane.workflow_runs import tables as workflow_runs

__all__ = ["workflow_runs"]
