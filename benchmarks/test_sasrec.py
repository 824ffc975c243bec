"""The plain SASRec reference (benchmarks/sasrec.py): its step's padding cut and sampled softmax."""

import torch
from torch import nn

from benchmarks.sasrec import Shape, build, step, train
from pipeline.run_dir import RunDir


def _model(run_dir, **shape):
    torch.manual_seed(0)
    model, _, ids, rows, catalogue_ids = build(RunDir(run_dir), Shape(dropout=0.0, **shape))
    still = torch.optim.SGD(model.parameters(), lr=0.0)  # step() updates nothing
    return model, still, ids, rows, catalogue_ids


def test_step_cuts_shared_padding_without_changing_the_loss(demo_prepared):
    model, still, ids, rows, catalogue_ids = _model(demo_prepared)
    order = (ids > 0).sum(1).argsort()[:8]  # the 8 shortest windows: mostly padding
    batch_ids, batch_rows = ids[order], rows[order]
    assert (batch_ids[:, 0] == 0).all()  # a padding column the step cuts
    loss, trained = step(model, still, batch_ids, batch_rows, catalogue_ids)
    x, target = batch_ids[:, :-1], batch_rows[:, 1:]
    mask = (x > 0) & (target >= 0)
    with torch.no_grad():
        h = model(x)[mask]
        full = nn.functional.cross_entropy(h @ model.items(catalogue_ids).T, target[mask])
    assert trained == int(mask.sum()) > 0
    assert abs(float(loss.detach()) - float(full)) < 1e-5


def test_sampled_softmax_scores_the_target_against_uniform_draws(demo_prepared):
    model, still, ids, rows, catalogue_ids = _model(demo_prepared)
    batch_ids, batch_rows = ids[:16], rows[:16]
    loss, _ = step(model, still, batch_ids, batch_rows, catalogue_ids, negatives=64,
                   generator=torch.Generator().manual_seed(5))
    drawn = torch.randint(len(catalogue_ids), (64,), generator=torch.Generator().manual_seed(5))
    x, target = batch_ids[:, :-1], batch_rows[:, 1:]
    mask = (x > 0) & (target >= 0)
    with torch.no_grad():
        h, t = model(x)[mask], target[mask]
        pos = (h * model.items(catalogue_ids[t])).sum(-1)
        neg = h @ model.items(catalogue_ids[drawn]).T
        hit = drawn[None, :] == t[:, None]
        assert hit.any()  # the demo catalogue is small: some draws are the target itself
        neg[hit] = float("-inf")
        expected = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
    assert abs(float(loss.detach()) - float(expected)) < 1e-5


def test_sampled_reference_trains_and_is_scored(demo_prepared):
    r = train(demo_prepared, Shape(epochs=2, negatives=32, batch=16), log=lambda line: None)
    assert r["shape"]["negatives"] == 32 and r["best_epoch"] in (1, 2)
    figures = r["test"]["masked"]
    assert set(figures) == {"HR@10", "HR@50", "HR@100", "NDCG@10"}
    assert 0 < figures["HR@100"] <= 1 and r["samples_per_s"] > 0
