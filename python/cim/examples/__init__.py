"""Example plugins shipped with the package (``examples/pipelines`` uses them)."""
