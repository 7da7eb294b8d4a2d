"""The engines the sidecar can run: the contract in :mod:`.base`, one module per engine."""
