"""Side networks, one module per method, registered by name."""
