"""pycluster.builtin.metrics."""
