"""atrund: social cloud hosting on the AT Protocol."""

__version__ = "0.1.0"
