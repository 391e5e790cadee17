"""pycluster.builtin.rpc."""
