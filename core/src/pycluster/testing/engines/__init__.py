"""pycluster.testing.engines."""
