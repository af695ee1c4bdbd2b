"""Reproductions of the paper's experiments; one module per figure, found by the CLI."""
