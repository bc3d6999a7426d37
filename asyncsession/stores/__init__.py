"""Session stores (repositories)."""
