"""AI Task Orchestra: run AI tasks from YAML templates against local model servers."""

__version__ = "0.1.0"
