"""approval."""
