"""Offline retrieval artifacts: batch embeddings, the FAISS index and its evaluation."""
