"""Default plugin "leaf": zones joined by NATS leaf nodes (see `pycluster.builtin.leaf.plugin`)."""
