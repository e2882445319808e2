"""pyqmail: a qmail-compatible mail transfer agent.

Each module does one qmail job (see docs/architecture.md); the command-line programs in
``pyqmail.cli`` are thin adapters over them.
"""

__version__ = "0.1.0"
