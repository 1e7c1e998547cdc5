"""Tools around training: ``rpgrl compare`` / ``plot``, ``check-loss`` / ``explain``."""
