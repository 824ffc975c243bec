"""Retrieval artifacts: exact and FAISS top-k behind one interface, metrics, batch
embedding, the index build and manifest, and evaluation exact and through the index.

Imports ``pipeline`` and ``towers`` (the model, lazily, where a tower embeds a table);
never ``training``, ``serve_app`` or ``jobs``.
"""
