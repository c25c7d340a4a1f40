"""pycluster's built-in plugins, imported as ``pycluster.plugins``."""
