"""Settings (`.env`, environment, defaults) and per-model settings (custom_models.yaml).
The bottom layer: it imports nothing else of model_serve but errors and fileio."""
