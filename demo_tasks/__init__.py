"""The demo tasks' data, scoring and training script (not installed: the trained folders ship in server/data)."""
