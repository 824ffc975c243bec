"""Feature kinds: one module per kind, one :class:`KindSpec` per kind in :data:`REGISTRY`.

Everything that differs between kinds is in its module and reached through its registry
entry: the config model (``features`` section), fitting (``pipeline.state.fit_feature``,
the prepare step), encoding (``pipeline.transforms.encode_feature``), the Arrow type check
(``pipeline.io``), the model input form (``towers.features`` maps a form to a module) and
the one-row arrays of a request (``serve_app.encode``). Adding a kind that reuses an input
form is one module and one entry::

    REGISTRY[MyKind.HOUR] = KindSpec(kind=MyKind.HOUR, config=HourFeature, ...)
"""

# pipeline.config re-exports the kind configs, which subclass its StrictModel: loading the
# config package first lets either package be the one imported first.
import pipeline.config  # noqa: F401
from pipeline.features import categorical, dense_vector, multi_hot, numeric, sequence, text
from pipeline.features.base import REGISTRY, FeatureConfig, InputForm, KindSpec, spec_of
from pipeline.state import FeatureKind, NumericTransform, Pooling

REGISTRY.update({spec.kind: spec for spec in (
    categorical.SPEC, multi_hot.SPEC, text.SPEC, numeric.SPEC, dense_vector.SPEC,
    sequence.SPEC,
)})

__all__ = ["REGISTRY", "FeatureConfig", "FeatureKind", "InputForm", "KindSpec",
           "NumericTransform", "Pooling", "spec_of"]
