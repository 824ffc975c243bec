"""The sequence encoders: what attention sees (clm / mlm), dropout, inference without padding."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.model import TransformerConfig
from towers.sequence_encoders import SequenceTransformer


def _changed_positions(layer: SequenceTransformer, j: int, masked=None) -> list[int]:
    """Positions whose state changes when the input at position j changes."""
    torch.manual_seed(0)
    x, mask = torch.randn(1, 5, 6), torch.ones(1, 5, dtype=torch.bool)
    base, _ = layer.states(x, mask, masked)
    x2 = x.clone()
    x2[0, j] += 1.0
    moved, _ = layer.states(x2, mask, masked)
    return [t for t in range(5) if not torch.allclose(base[0, t], moved[0, t], atol=1e-6)]


def test_clm_attention_sees_items_up_to_t_and_mlm_sees_both_sides():
    causal = SequenceTransformer(6, 5, TransformerConfig(dim=8, num_layers=2, causal=True,
                                                         dropout=0.0)).eval()
    for j in range(5):  # item j reaches positions j .. 4 only
        assert _changed_positions(causal, j) == list(range(j, 5))
    both = SequenceTransformer(6, 5, TransformerConfig(dim=8, num_layers=2, causal=False,
                                                       dropout=0.0)).eval()
    both.add_mask_token()
    assert _changed_positions(both, 0) == [0, 1, 2, 3, 4]
    # a masked position's own input is replaced by the mask token: changing it changes nothing
    masked = torch.tensor([[False, False, True, False, False]])
    assert _changed_positions(both, 2, masked) == []
    assert _changed_positions(both, 1, masked) == [0, 1, 2, 3, 4]


def test_block_dropout_keeps_the_mean_and_masks_the_gradient():
    # towers.sequence_encoders.dropout: about p of the entries zeroed, the rest scaled by
    # 1 / (1 - p), the gradient the same mask; identity in eval mode or at p = 0
    from towers.sequence_encoders import dropout

    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - 0.3) < 0.005  # 100,000 draws: the std of the fraction is 0.0014
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert abs(y.mean().item() - 1.0) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask / (1 - p) = y here
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x


def test_attention_dropout_is_its_own_setting():
    # in training mode only dropout's randomness can make two passes differ: with the
    # attention weights' dropout at 0 (and none elsewhere) they agree, at 0.5 they do not;
    # unset, it follows dropout
    def two_passes(**cfg):
        layer = SequenceTransformer(6, 5, TransformerConfig(dim=8, num_layers=2, **cfg)).train()
        x, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
        return layer.states(x, mask)[0], layer.states(x, mask)[0], layer

    a, b, layer = two_passes(dropout=0.0, attention_dropout=0.0)
    assert torch.equal(a, b) and layer.blocks[0].p == 0.0
    a, b, layer = two_passes(dropout=0.0, attention_dropout=0.5)
    assert not torch.allclose(a, b) and layer.blocks[0].p == 0.5
    a, b, layer = two_passes(dropout=0.3, attention_dropout=0.0)
    assert not torch.allclose(a, b) and layer.blocks[1].p == 0.0
    assert two_passes(dropout=0.3)[2].blocks[0].p == 0.3


def test_input_dropout_drops_the_embedded_history_in_training_only():
    # every other dropout at 0: two training passes differ only through input_dropout,
    # and an eval pass equals the pass of a layer without it (same weights)
    torch.manual_seed(0)
    cfg = dict(dim=8, num_layers=1, dropout=0.0, attention_dropout=0.0)
    layer = SequenceTransformer(6, 5, TransformerConfig(input_dropout=0.5, **cfg))
    x, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    layer.train()
    assert not torch.allclose(layer.states(x, mask)[0], layer.states(x, mask)[0])
    plain = SequenceTransformer(6, 5, TransformerConfig(**cfg))
    plain.load_state_dict(layer.state_dict())
    plain.train()
    assert torch.equal(plain.states(x, mask)[0], plain.states(x, mask)[0])
    layer.eval()
    assert torch.equal(layer.states(x, mask)[0], plain.states(x, mask)[0])


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "attention"])
@pytest.mark.parametrize("causal", [True, False])
def test_inference_cuts_padding_and_computes_only_what_pooling_reads(pooling, causal):
    # forward cuts the leading columns that are padding in every row and, pooling the last
    # position, runs the last block for that position only: the result equals pooling every
    # position's state over the whole window, and each row alone (cut to its own length)
    torch.manual_seed(0)
    layer = SequenceTransformer(6, 12, TransformerConfig(dim=8, num_layers=2, causal=causal,
                                                         pooling=pooling)).eval()
    x = torch.randn(4, 12, 6)
    lengths = torch.tensor([0, 3, 7, 5])  # no row is full: 5 leading columns are cut
    mask = torch.arange(12) >= 12 - lengths[:, None]
    got = layer(x, mask)
    states, attendable = layer.states(x, mask)
    assert got.shape == (4, 8)
    assert torch.allclose(got, layer.pool(states, attendable), atol=1e-6)
    for row, n in enumerate(lengths.tolist()):
        keep = slice(12 - max(n, 1), None)
        alone = layer(x[row:row + 1, keep], mask[row:row + 1, keep])
        assert torch.allclose(alone[0], got[row], atol=1e-6)
    last, _ = layer.states(x, mask, last_only=True)
    assert last.shape == (4, 1, 8) and torch.allclose(last[:, 0], states[:, -1], atol=1e-6)
