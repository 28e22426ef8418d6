"""Fixtures for the DICOM node's tests; the helpers live in nodekit.py (imported by name, so that no test depends on
which of the suite's conftest modules Python cached as ``conftest``)."""

from nodekit import orthanc  # noqa: F401 - the fixture, registered here
