"""Talking to container registries, for the verifier and the deployer alike."""
