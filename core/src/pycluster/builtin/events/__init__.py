"""pycluster.builtin.events."""
