"""The tile server's library: job outputs and input scenes as XYZ tiles, renderings, security."""
