"""Retrieval artifacts: exact and FAISS top-k, metrics, batch embedding, index, evaluation.

Exact and FAISS top-k share one interface; the index build writes its manifest; evaluation
runs exact and through the index. Imports ``pipeline`` and ``towers`` (the model, lazily,
where a tower embeds a table); never ``training``, ``serve_app`` or ``jobs``.
"""
