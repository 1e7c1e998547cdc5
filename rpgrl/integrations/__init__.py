"""Adapters that plug rpgrl's losses into other trainers (verl, TRL)."""
