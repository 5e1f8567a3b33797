"""The studio's docked views: density, curves, solver diagnostics and log."""
