"""Training: configuration, the two stages (auto-encoding, auto-decoding), checkpoints."""
