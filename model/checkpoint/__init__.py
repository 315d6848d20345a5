"""Checkpoints: config.json, safetensors loading through one name table, and the tiny-random checkpoint."""
