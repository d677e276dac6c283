"""The command line: `postdiff-compile` (compile, explain), the artifact commands and the lab's quality commands."""
from .main import main

__all__ = ["main"]
