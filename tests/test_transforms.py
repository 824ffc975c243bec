"""Hand-worked expectations for every feature type's pure transform."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import config as C
from pipeline import features as F
from pipeline import state
from pipeline import transforms as T


def fitted(feat, values):
    if values is not None and not isinstance(values, pa.Array):
        values = pa.array(values)
    return F.fit_feature(feat, values)


def test_categorical_lookup_null_and_oov():
    # counts: b=3, a=2, c=1 -> min_count 2 keeps [b, a]; indices: pad 0, oov 1, b 2, a 3
    st = fitted(C.CategoricalFeature(name="c", min_count=2), ["a", "b", "b", "c", "a", "b"])
    assert st.vocab == ["b", "a"] and st.num_embeddings == 4
    out = F.encode_feature(["a", "b", "c", None, "zzz"], st, "c")["c"]
    np.testing.assert_array_equal(out, [3, 2, 1, 0, 1])


def test_categorical_int_ids_accept_other_types_as_unseen():
    st = fitted(C.CategoricalFeature(name="id"), [7, 7, 5])
    assert st.vocab == [7, 5] and st.vocab_type == "int64"
    np.testing.assert_array_equal(T.lookup(["7", "5", "x"], st.vocab_array()), [2, 3, 1])
    np.testing.assert_array_equal(T.lookup(np.array([5, 6]), st.vocab_array()), [3, 1])


def test_max_vocab_keeps_most_frequent_ties_by_value():
    vocab, vtype = state.fit_vocab(pa.array(["z", "y", "y", "x", "z", "w"]), 1, 3)
    assert (vocab, vtype) == (["y", "z", "w"], "string")  # y=2, z=2, then w<x by value


def test_hash_buckets_stable_and_in_range():
    st = fitted(C.CategoricalFeature(name="h", hash_buckets=7), ["a"])
    assert st.num_embeddings == 9 and st.vocab is None
    a = F.encode_feature(["a", "b", "a", None, "a-very-long-value"], st, "h")["h"]
    assert a[0] == a[2] and a[3] == 0
    assert ((a[[0, 1, 2, 4]] >= 2) & (a[[0, 1, 2, 4]] <= 8)).all()
    # FNV-1a 64 of b"a" is 0xaf63dc4c8601ec8c; mod 7 = 5 -> index 5 + 2 = 7
    assert 0xAF63DC4C8601EC8C % 7 + 2 == a[0] == 7


def test_multi_hot_pads_truncates_and_handles_null_rows():
    st = fitted(C.MultiHotFeature(name="g", max_length=2), ["x", "y", "x"])
    assert st.vocab == ["x", "y"]
    out = T.encode_bag(pa.array([["y", "x", "x"], [], None, ["new"]]), st)
    np.testing.assert_array_equal(out, [[3, 2], [0, 0], [0, 0], [1, 0]])


def test_text_tokenises_lowercase_alphanumeric():
    tokens = T.tokenize(["The Big-Cat!", None, "  ", "cat 42"]).to_pylist()
    assert tokens == [["the", "big", "cat"], [], [], ["cat", "42"]]
    st = fitted(C.TextFeature(name="t", min_count=2, max_tokens=3),
                pa.array(["cat", "cat", "big", "the", "the"]))
    assert st.vocab == ["cat", "the"]  # big seen once < min_count 2
    out = T.encode_text(["The big CAT", "nothing"], st)
    np.testing.assert_array_equal(out, [[3, 1, 2], [1, 0, 0]])


def test_numeric_standardize_with_mean_fill():
    # values 1, 3 (null dropped): mean 2; filled [1, 3, 2] -> mean 2, std sqrt(2/3)
    st = fitted(C.NumericFeature(name="n"), [1.0, 3.0, None])
    assert st.fill_value == 2.0 and st.mean == 2.0
    assert st.std == pytest.approx(np.sqrt(2 / 3))
    value, missing = T.encode_numeric([1.0, None, float("nan")], st)
    np.testing.assert_allclose(value, [-1 / np.sqrt(2 / 3), 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(missing, [0, 1, 1])


def test_numeric_log_and_bucketize():
    # log1p of [0, e-1] = [0, 1]: mean 0.5, std 0.5 -> [-1, 1]
    st = fitted(C.NumericFeature(name="n", transform="log", fill="zero"), [0.0, np.e - 1])
    value, _ = T.encode_numeric([0.0, np.e - 1, -5.0], st)
    np.testing.assert_allclose(value, [-1.0, 1.0, -1.0], rtol=1e-6)  # negatives clip to 0
    st = fitted(C.NumericFeature(name="b", transform="bucketize", boundaries=[10, 20]), [1.0])
    assert st.num_embeddings == 4  # buckets 1..3 plus reserved 0
    buckets, missing = T.encode_numeric([5, 10, 19.9, 25, None], st)
    np.testing.assert_array_equal(buckets, [1, 2, 2, 3, 1])  # null -> fill 1.0 -> bucket 1
    np.testing.assert_array_equal(missing, [0, 0, 0, 0, 1])


def test_numeric_quantile_buckets():
    st = fitted(C.NumericFeature(name="q", transform="bucketize", num_buckets=4),
                [float(v) for v in range(1, 9)])
    assert st.boundaries == pytest.approx([2.75, 4.5, 6.25])


def test_dense_vector_shape_nulls_and_length_error():
    st = fitted(C.DenseVectorFeature(name="e", dim=2), None)
    out = T.encode_dense(pa.array([[1.0, 2.0], None, [0.5, 0.25]], pa.list_(pa.float32())),
                         st, "e")
    np.testing.assert_array_equal(out, [[1, 2], [0, 0], [0.5, 0.25]])
    with pytest.raises(ValueError, match=r"row 1: column 'e' \(dense_vector 'e'\) has 1 row\(s\) "
                                         r"of the wrong length, this one 3 values; accepted: a "
                                         r"list of exactly dim=2 numbers, or null"):
        T.encode_dense([[1.0, 2.0], [1.0, 2.0, 3.0]], st, "e")


def test_sequence_prepadded_most_recent_last():
    vocab = pa.array([11, 10, 12], pa.int64())
    out = T.encode_sequence([[11, 12, 13, 10], [10], []], vocab, 3)
    # row 0 keeps the last three: 12->4, 13->oov 1, 10->3
    np.testing.assert_array_equal(out, [[4, 1, 3], [0, 0, 3], [0, 0, 0]])


def test_pad_bags_matches_a_python_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 7, size=50)
    offsets = np.r_[0, np.cumsum(lengths)]
    flat = rng.integers(1, 100, size=offsets[-1])
    for pre in (False, True):
        out = T.pad_bags(flat, offsets, 4, pre=pre)
        for r in range(50):
            row = list(flat[offsets[r]:offsets[r + 1]])
            row = row[-4:] if pre else row[:4]
            want = [0] * (4 - len(row)) + row if pre else row + [0] * (4 - len(row))
            assert out[r].tolist() == want


def test_transform_tower_reports_missing_column():
    tower = state.TowerState({"c": fitted(C.CategoricalFeature(name="c"), ["a"])})
    with pytest.raises(ValueError, match="column 'c' missing"):
        F.transform_tower({"other": ["a"]}, tower)


@pytest.mark.parametrize("kind", ["int64", "string"])
def test_vocab_index_agrees_with_the_arrow_lookup_on_10000_random_keys(kind):
    rng = np.random.default_rng(7)
    pool = rng.choice(10**9, 60_000, replace=False)  # first 50,000 in the vocabulary
    vocab = pa.array(pool[:50_000] if kind == "int64" else pool[:50_000].astype(str))
    keys = rng.choice(pool, 10_000).tolist()  # about 1 in 6 out of vocabulary
    keys = keys if kind == "int64" else [str(k) for k in keys]
    keys[::97] = [None] * len(keys[::97])
    want = T.lookup(keys, vocab)  # the Arrow path
    assert (want == T.OOV).sum() > 1000 and (want == T.PAD).sum() == len(keys[::97])
    assert (want >= 2).sum() > 7000
    dict_path = T.VocabIndex(vocab, arrow_from=10**9)  # every call through the dict
    np.testing.assert_array_equal(dict_path.lookup(keys), want)
    np.testing.assert_array_equal(T.VocabIndex(vocab).lookup(keys), want)  # long: Arrow
    # a request's few values: the dict path, same answers one by one
    for key, index in list(zip(keys, want, strict=True))[:300]:
        assert dict_path.lookup([key])[0] == index
    # one value at a time (a request's user id), every key, nulls and OOV included
    assert [dict_path.lookup_one(key) for key in keys] == want.tolist()


def test_vocab_index_casts_by_the_one_rule():
    vocab = pa.array([7, 12, -3])
    index = T.VocabIndex(vocab)
    # "7" and "07" cast to 7; " 7", "+7", "7.0" and full-width digits do not cast, so the
    # whole request compares as text, where only "7" equals str(7)
    for values in (["7", "07", "-3", None], ["7", " 7", "+7", "7.0", "\uff17", "x", "12"]):
        np.testing.assert_array_equal(index.lookup(values), T.lookup(values, vocab))
    np.testing.assert_array_equal(index.lookup(["7", "07", "-3", None]), [2, 2, 4, 0])
    np.testing.assert_array_equal(index.lookup(["7", " 7", "\uff17", "x", "12"]),
                                  [2, 1, 1, 1, 3])
    assert T.cast_like(pa.array(["07"]), pa.int64()) == (pa.array([7]), False)
    # pickled (Ray sends states to workers) without its tables, answering the same
    import pickle

    index.lookup([7])
    copy = pickle.loads(pickle.dumps(index))
    assert copy._tables == {} and copy.lookup([12, 5]).tolist() == [3, 1]
