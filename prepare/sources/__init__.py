"""Input sources: the demo data generator and the MovieLens and sequence-file converters."""
