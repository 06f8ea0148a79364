"""EDC-side outbound connectors. Installed as ``esource.connectors``."""
