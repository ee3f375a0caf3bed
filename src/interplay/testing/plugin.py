"""pytest plugin registered by interplay (fixtures for apps under test)."""
