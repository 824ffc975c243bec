"""Input sources: the demo data generator and the MovieLens converter (no Ray)."""
