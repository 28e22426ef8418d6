"""medsight: medical image classification from scans to an explained, served model."""

__version__ = "0.1.0"
