"""Shipped device profiles (one YAML per target), installed as edgeexit.device_profiles."""
