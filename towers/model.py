"""The two-tower model: one :class:`Tower` class, two instances, built from config + state.

The model only returns embeddings (``encode_user``, ``encode_item``) and scores them; the
loss belongs to the training task and retrieval to serving. :func:`build_two_tower` builds
the item tower first so the user tower's history can reuse (tie) the item tower's id
embedding and item-feature tables: the very same ``nn.Embedding`` objects.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config.model import ModelConfig, TowerConfig
from pipeline.config.plan import ModelPlan, TowerPlan
from pipeline.run_dir import MODEL_FILE, ModelMeta, RunDir, load_fitted, read_model_meta
from pipeline.state import FeatureState, FeatureStateSet, TowerState
from towers import bodies
from towers.features import FeatureEncoder, Spec

TEMPERATURE_RANGE = (0.01, 10.0)  # a learnable temperature is clamped to this range


class Tower(nn.Module):
    """Feature encoder -> body -> Linear to ``output_dim`` (-> L2 norm for cosine).

    Args:
        name: ``"user"`` or ``"item"`` (used in error messages and export).
        state: the tower's fitted features.
        cfg: the tower's model config.
        model_cfg: the model config (output width, similarity).
        plan: the tower as config validation resolved it.
        item_states: the item tower's fitted features (user tower with history only).
        shared: sequence name -> {item feature name: the item tower's table to reuse}.
    """

    def __init__(self, name: str, state: TowerState, cfg: TowerConfig, model_cfg: ModelConfig,
                 plan: TowerPlan, item_states: Mapping[str, FeatureState] | None = None,
                 shared: Mapping[str, Mapping[str, nn.Embedding]] | None = None):
        super().__init__()
        self.name = name
        where = f"model.{name}"
        self.encoder = FeatureEncoder(state, cfg, plan, where, item_states, shared)
        body = bodies.TOWER_BODIES.get(cfg.type)
        if body is None:
            raise ValueError(f"{where}.type={cfg.type.value} has no registered body; "
                             f"accepted: {[t.value for t in bodies.TOWER_BODIES]}")
        self.body = body(self.encoder, cfg)
        self.output = nn.Linear(self.body.output_dim(), model_cfg.output_dim)
        self.normalize = model_cfg.similarity.normalized

    def output_dim(self) -> int:
        """Embedding width D."""
        return self.output.out_features

    def input_spec(self) -> Spec:
        """Expected batch keys: ``{key: (dtype, shape after the batch dim)}``."""
        return self.encoder.input_spec()

    def regularization_loss(self) -> Tensor:
        """The tower's variational dropout penalty (scalar; 0 when off)."""
        return self.encoder.regularization_loss().to(self.output.weight.device)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Embed a batch.

        Args:
            features: the tower's inputs as :meth:`input_spec` lists them, each [B, ...].

        Returns:
            [B, D] embeddings (unit norm when the similarity is cosine).
        """
        return self._project(self.body(self.encoder(features)))

    def positions(self, features: dict[str, Tensor], masked: Tensor | None = None) -> Tensor:
        """Embed every position of each history (the sequence training mode).

        Args:
            features: the tower's inputs, each [B, ...] (the history [B, L]).
            masked: [B, L] bool positions whose input is the mask token (mlm), or None.

        Returns:
            [B, L, D] embeddings; the last position's is :meth:`forward`'s (clm).

        Raises:
            ValueError: the body pools its history (it has no per-position output).
        """
        positions = getattr(self.body, "positions", None)
        if positions is None:
            raise ValueError(f"model.{self.name}.type={type(self.body).__name__} has no "
                             "per-position output; the sequence mode needs a transformer or "
                             "cnn body")
        return self._project(positions(self.encoder(features), masked))

    def _project(self, hidden: Tensor) -> Tensor:
        """Body output [..., H] -> [..., D] (L2-normalised for cosine)."""
        emb = self.output(hidden)
        return F.normalize(emb, dim=-1) if self.normalize else emb


class TwoTowerModel(nn.Module):
    """A user tower and an item tower that embed into the same D-dimensional space.

    Args:
        user_tower: the user tower.
        item_tower: the item tower.
        temperature: the loss divides scores by it.
        learnable_temperature: learn ``log(temperature)``, clamped to
            :data:`TEMPERATURE_RANGE`.
    """

    def __init__(self, user_tower: Tower, item_tower: Tower, temperature: float,
                 learnable_temperature: bool = False):
        super().__init__()
        if user_tower.output_dim() != item_tower.output_dim():
            raise ValueError(f"user tower output_dim={user_tower.output_dim()} differs from "
                             f"item tower output_dim={item_tower.output_dim()}")
        lo, hi = TEMPERATURE_RANGE
        if learnable_temperature and not lo <= temperature <= hi:
            raise ValueError(f"model.temperature={temperature} must lie in [{lo}, {hi}] when "
                             "model.learnable_temperature=true")
        self.user_tower, self.item_tower = user_tower, item_tower
        self.learnable_temperature = learnable_temperature
        log_t = torch.tensor(math.log(temperature))
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def encode_user(self, features: dict[str, Tensor]) -> Tensor:
        """User-tower inputs -> [B, D]."""
        return self.user_tower(features)

    def encode_item(self, features: dict[str, Tensor]) -> Tensor:
        """Item-tower inputs -> [N, D]."""
        return self.item_tower(features)

    def encode_user_positions(self, features: dict[str, Tensor],
                              masked: Tensor | None = None) -> Tensor:
        """User-tower inputs -> [B, L, D], one embedding per history position."""
        return self.user_tower.positions(features, masked)

    def temperature(self) -> Tensor:
        """Scalar temperature (the fixed value, or the learned one clamped)."""
        t = self.log_temperature.exp()
        return t.clamp(*TEMPERATURE_RANGE) if self.learnable_temperature else t

    def regularization_loss(self) -> Tensor:
        """Sum of both towers' variational dropout penalties (scalar; 0 when off)."""
        return self.user_tower.regularization_loss() + self.item_tower.regularization_loss()


def shared_tables(plan: ModelPlan, fitted: FeatureStateSet,
                  item_tower: Tower) -> dict[str, dict[str, nn.Embedding]]:
    """For each tied user history (``plan.tied``): the item tower's id and item-feature tables.

    Returns:
        sequence name -> {item feature name: the item tower's ``nn.Embedding``}.

    Raises:
        ValueError: the item table is missing or its rows differ from the history's
            vocabulary (a state fitted apart from the model's config: re-run prepare).
    """
    out = {}
    for name in plan.tied:
        st = fitted.user.features[name]
        id_table = item_tower.encoder.table(st.vocab_of) if st.vocab_of else None
        if id_table is None or id_table.num_embeddings != st.num_embeddings:
            rows = id_table.num_embeddings if id_table is not None else None
            raise ValueError(f"user sequence {name!r} ({st.num_embeddings} rows) is tied to "
                             f"item feature {st.vocab_of!r} ({rows} rows); re-run prepare")
        tables = {st.vocab_of: id_table}
        for f in st.item_features:
            table = item_tower.encoder.table(f)
            if table is not None:
                tables[f] = table
        out[name] = tables
    return out


def build_two_tower(model_cfg: ModelConfig, fitted: FeatureStateSet,
                    plan: ModelPlan) -> TwoTowerModel:
    """Build both towers from the model config, the fitted feature state and the plan.

    The item tower comes first; user histories tied to it (``plan.tied``) share its id and
    item-feature tables: the very same ``nn.Embedding`` objects. With ``plan.mask_token``
    (``sequence.objective=mlm``) the user tower's transformer learns a mask token, which
    its forward appends after the last history item. ``plan`` is
    :attr:`Config.plan <pipeline.config.Config.plan>` (or
    :func:`~pipeline.config.plan.plan_for_state`): every cross-check ran there.
    """
    item = Tower("item", fitted.item, model_cfg.item, model_cfg, plan.item)
    user = Tower("user", fitted.user, model_cfg.user, model_cfg, plan.user,
                 item_states=fitted.item.features,
                 shared=shared_tables(plan, fitted, item))
    if plan.mask_token:
        user.body.sequence_encoder.add_mask_token()
    model = TwoTowerModel(user, item, model_cfg.temperature, model_cfg.learnable_temperature)
    if model_cfg.embedding_init_std is not None:
        init_embeddings(model, model_cfg.embedding_init_std)
    return model


def init_embeddings(model: nn.Module, std: float) -> None:
    """Draw every embedding table N(0, std^2), padding rows kept at zero (shared tables once)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()


def model_version(model: nn.Module) -> str:
    """A short content hash of the ``state_dict`` (names, dtypes, shapes and bytes).

    Deterministic: equal weights give the same version on any machine.
    """
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_trained(run: RunDir, device: str | torch.device = "cpu",
                 model_dir: Path | None = None
                 ) -> tuple[TwoTowerModel, ModelMeta, FeatureStateSet]:
    """The published model of a run directory (``model/``), in eval mode, with its meta.

    ``model_dir`` reads the weights from another folder (a checkpoint being published).

    Raises:
        FileNotFoundError: ``model/`` or the feature state is missing.
        ValueError: the model was trained on another feature state than ``prepared/``.
    """
    model_dir = Path(model_dir or run.model)
    meta = read_model_meta(model_dir)
    fitted = load_fitted(run, meta)
    model = build_two_tower(meta.config.model, fitted, meta.plan or meta.config.plan)
    weights = torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    return model.to(device).eval(), meta, fitted

