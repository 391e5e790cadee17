"""pycluster.builtin.audit."""
