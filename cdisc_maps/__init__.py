"""Per-study maps and shared CDASH templates (data). Installed as ``esource.builtin_maps``."""
