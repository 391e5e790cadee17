"""pycluster.builtin.health."""
