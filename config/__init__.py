"""Demo configuration (data). Installed as ``esource.builtin_config``."""
