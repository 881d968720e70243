"""Command-line entry points (``rlhf-train``, ...)."""
