"""The `recyclegpt` command line (`main`) and the options its subcommands share (`options`)."""

from .main import main

__all__ = ["main"]
