"""monoflow studio: the desktop app (PySide6 + pyqtgraph) for training and exploring Monotone Flows."""
