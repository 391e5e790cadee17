"""pycluster.kernel."""
