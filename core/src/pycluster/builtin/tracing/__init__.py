"""pycluster.builtin.tracing."""
