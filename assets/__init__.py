"""Data shipped with monoflow: run presets (``presets/*.json``) and example models (``models/*.safetensors``)."""
