"""pycluster.builtin.election."""
