"""The binary-translation CPU engine (pure Python)."""
