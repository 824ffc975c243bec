"""Top-k retrieval over item embeddings: an exact oracle and FAISS behind one interface.

``TopK.search(queries, k, exclude, allow)`` returns ``(scores [Q, k] float32, ids [Q, k]
int64)`` with the caller's item ids (from the id map), best first. Fewer than ``k`` results
(``k`` larger than the catalogue or than the allowed items, an ANN index that found fewer)
are padded with id ``-1`` and score ``-inf``.

Exclusions and allow-lists apply per query, so one long list never widens its neighbours'
search: queries with at most ``WIDEN_MAX`` exclusions and no allow-list are searched
together, with ``k`` + their longest exclusion list and masked in one vectorised step (a
Flat index up to ``DENSE_MAX_ITEMS``: every score in one product, the excluded pairs set
to -inf, so no exclusion list is too long to join them); each other query is searched
alone, by brute force over its allowed items when they are at most ``BRUTE_FORCE_MAX`` or
``BRUTE_FORCE_FRACTION`` of the catalogue (exact), else through the index with a faiss
``IDSelector`` (a bitmap of the allowed items, a hash set of the excluded ones), falling
back to brute force when a graph search under a selective filter returns fewer than ``k``
of the items that qualify.

The similarity decides both normalisation and metric: ``cosine`` L2-normalises items and
queries and uses inner product; ``dot`` uses inner product on the raw vectors.

The package: ``base.py`` (the interface, the id map and per-query filter planning),
``kernels.py`` (the dense numpy kernels), ``exact.py`` (the exact oracle), ``faiss_index.py``
(FAISS), ``store.py`` (the default factory, build, save and load). Import from the module
that defines a name.

On disk (never pickle): ``ids.npy`` (``allow_pickle=False``), and ``index.faiss``
(``faiss.write_index``) or, for the exact kind, the stored vectors as ``embeddings.npy``.
``save(dir)`` returns the index's one metadata record, :class:`~indexing.topk.base.TopKMeta`
{kind, factory, similarity, dim, count, params}, which the caller keeps (a run directory:
``index/manifest.json``); ``load_topk(dir, meta)`` reads either kind.

FAISS threads: left at faiss's default (OpenMP, all cores); set
``faiss.omp_set_num_threads`` in the caller (e.g. a Serve replica's ``num_cpus``). HNSW
graphs built with several threads differ between builds; a saved index searches the same.
"""
