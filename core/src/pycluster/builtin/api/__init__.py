"""pycluster.builtin.api."""
