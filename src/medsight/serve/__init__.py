"""REST service and web page for a bundle: ``create_app(bundle_path)`` (see :mod:`medsight.serve.app`)."""

from medsight.serve.app import create_app

__all__ = ["create_app"]
