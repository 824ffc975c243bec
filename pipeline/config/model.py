"""The ``model`` section: the two towers, their bodies and the similarity.

Sizes of inputs are never given here: embedding tables come from the fitted feature state.
"""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from pipeline.strict import StrictModel


class Similarity(str, enum.Enum):
    """How a user and an item embedding are scored; decides normalisation and FAISS metric."""

    DOT = "dot"
    COSINE = "cosine"

    @property
    def normalized(self) -> bool:
        """Cosine is a dot product of L2-normalised vectors: the one home of that rule."""
        return self is Similarity.COSINE


class IdInit(str, enum.Enum):
    """How the item tower's id table starts."""

    RANDOM = "random"
    SVD = "svd"


class TowerType(str, enum.Enum):
    """The body that turns a tower's embedded features into its output."""

    MLP = "mlp"
    TRANSFORMER = "transformer"
    FUSION = "fusion"
    CNN = "cnn"


class Aggregation(str, enum.Enum):
    """How a tower's feature embeddings are combined (Transformers4Rec's three modes)."""

    CONCAT = "concat"
    SUM = "sum"  # element-wise sum of projections to one width
    SUM_ITEM_MULTIPLY = "sum_item_multiply"  # sum of the others, times the item-id embedding
    GATING = "gating"  # softmax-gated sum of projections to one width (gate from all of them)


class Activation(str, enum.Enum):
    """MLP activation."""

    RELU = "relu"
    GELU = "gelu"
    TANH = "tanh"
    LEAKY_RELU = "leaky_relu"


class Norm(str, enum.Enum):
    """Normalisation after each hidden MLP layer."""

    BATCH = "batch"
    LAYER = "layer"
    NONE = "none"


class SequencePooling(str, enum.Enum):
    """How a transformer / CNN turns a sequence of states into one vector."""

    LAST = "last"
    MEAN = "mean"
    ATTENTION = "attention"
    MAX = "max"


class FusionMode(str, enum.Enum):
    """How the fusion body combines its sub-encoders."""

    CONCAT = "concat"
    ATTENTION = "attention"
    GATING = "gating"


class MLPConfig(StrictModel):
    """The MLP body, also used as the head on top of the other bodies."""

    hidden: list[int] = Field(default_factory=lambda: [256], description="Hidden layer widths.")
    activation: Activation = Field(default=Activation.RELU, description="Activation.")
    norm: Norm = Field(default=Norm.LAYER, description="Normalisation per hidden layer.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout per layer.")
    residual: bool = Field(default=True, description="Skip connection where sizes match.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute in backward.")


class TransformerConfig(StrictModel):
    """Self-attention over the user's history sequence (user tower only)."""

    sequence: str | None = Field(
        default=None, description="Sequence feature to attend over; default: the only one."
    )
    dim: int = Field(default=64, ge=8, description="Model width (d_model).")
    num_layers: int = Field(default=2, ge=1, description="Encoder blocks.")
    num_heads: int = Field(default=2, ge=1, description="Attention heads; must divide dim.")
    ff_multiplier: int = Field(default=4, ge=1, description="Feed-forward width / dim.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout.")
    attention_dropout: float | None = Field(
        default=None, ge=0.0, lt=1.0,
        description="Dropout on the attention weights; default: dropout. 0 lets SDPA use its "
                    "fused kernel (on CPU about half the attention time).",
    )
    input_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Dropout on the history's embeddings (with their positions) before the "
                    "first block, as SASRec and nanoGPT drop their token embeddings.",
    )
    causal: bool = Field(default=False, description="Causal attention mask.")
    pooling: SequencePooling = Field(default=SequencePooling.LAST, description="Pooling.")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TransformerConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"transformer dim={self.dim} is not divisible by "
                             f"num_heads={self.num_heads}")
        return self


class CNNConfig(StrictModel):
    """1-D convolutions over a sequence feature."""

    sequence: str | None = Field(
        default=None, description="Sequence feature; default: the only one."
    )
    channels: list[int] = Field(default_factory=lambda: [64], description="Channels per layer.")
    kernel_size: int = Field(default=3, ge=1, description="Kernel width.")
    pooling: SequencePooling = Field(default=SequencePooling.MAX, description="Pooling.")


class FusionConfig(StrictModel):
    """Sub-encoders over groups of features, combined by concat, attention or gating."""

    groups: dict[str, list[str]] = Field(
        description="Group name -> feature names; features in no group form a group 'rest'."
    )
    dim: int = Field(default=64, ge=1, description="Width each group is projected to.")
    mode: FusionMode = Field(default=FusionMode.GATING, description="How groups combine.")


class TowerConfig(StrictModel):
    """One tower: which features, how they are aggregated, which body."""

    type: TowerType = Field(default=TowerType.MLP, description="Body type.")
    features: list[str] | None = Field(
        default=None, description="Subset of the tower's configured features; default: all."
    )
    aggregation: Aggregation = Field(default=Aggregation.CONCAT, description="Aggregation.")
    aggregation_dim: int | None = Field(
        default=None, ge=1, description="Common width for sum and gating aggregations; "
        "default: the largest feature width."
    )
    numeric_projection_dim: int | None = Field(
        default=None, ge=1, description="Project numeric inputs to this width; default: as-is."
    )
    dense_projection_dim: int = Field(default=16, ge=1, description="dense_vector projection.")
    variational_dropout: bool = Field(
        default=False, description="Learned per-feature dropout with its penalty in the loss."
    )
    mlp: MLPConfig = Field(default_factory=MLPConfig, description="MLP body / head.")
    transformer: TransformerConfig = Field(default_factory=TransformerConfig,
                                           description="The body for type=transformer.")
    cnn: CNNConfig = Field(default_factory=CNNConfig, description="The body for type=cnn.")
    fusion: FusionConfig | None = Field(default=None, description="Required for type=fusion.")

    @model_validator(mode="after")
    def _fusion_needs_groups(self) -> TowerConfig:
        if self.type is TowerType.FUSION and self.fusion is None:
            raise ValueError("type=fusion needs a fusion section with groups")
        return self


class ModelConfig(StrictModel):
    """The two-tower model: one tower class, two instances."""

    output_dim: int = Field(default=64, ge=1, description="Embedding width of both towers.")
    similarity: Similarity = Field(default=Similarity.COSINE, description="dot or cosine.")
    temperature: float = Field(default=0.05, description="Scores are divided by it.")
    learnable_temperature: bool = Field(default=False, description="Learn log(temperature).")
    tie_sequence_embedding: bool | None = Field(
        default=None,
        description="History item ids share the item tower's id embedding; default (null): "
        "tied when the two embedding widths are equal.",
    )
    embedding_init_std: float | None = Field(
        default=None, gt=0, description="Initialise every embedding table N(0, std^2) (the "
        "padding row stays zero); null keeps PyTorch's N(0, 1). Small tables (0.02, as "
        "BERT and RecBole do) let few optimiser steps move the embeddings."
    )
    item_id_init: IdInit = Field(
        default=IdInit.RANDOM, description="random: the id table is drawn like every table; "
        "svd: it starts from the top singular vectors of the training user-item matrix "
        "(PureSVD item factors, seconds to compute), rescaled to the drawn table's spread, "
        "so items bought together start close; tied histories share it."
    )
    item_id_lr_scale: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Multiplier of train.lr for the item id "
        "table (and the histories tied to it): below 1 the table moves slower than the "
        "towers, so the factors item_id_init=svd wrote stay while the towers learn to use "
        "them; 0 freezes it."
    )
    user: TowerConfig = Field(default_factory=TowerConfig, description="User tower.")
    item: TowerConfig = Field(default_factory=TowerConfig, description="Item tower.")

    @model_validator(mode="after")
    def _temperature_positive(self) -> ModelConfig:
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be > 0 when similarity is "
                             f"{self.similarity.value}")
        return self
