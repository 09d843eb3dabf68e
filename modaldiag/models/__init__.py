"""Models: the contract (encoders + head), fusion heads, ``wrap`` and default encoders."""

from ..utils.validation import POSITIVE_INT, Satisfies, as_plain_int, validate_params
from .classifier import MultimodalClassifier
from .contract import MultimodalModel
from .encoders import Conv1dEncoder, Conv2dEncoder, FrameEncoder, MLPEncoder, encoder_for_shape
from .fusion import FUSIONS, CosineFusion
from .midfusion import MidFusionClassifier, mid_fusion_model
from .wrap import WrappedModel, wrap

__all__ = ["MultimodalModel", "MultimodalClassifier", "WrappedModel", "wrap", "FUSIONS",
           "CosineFusion",
           "MLPEncoder", "Conv1dEncoder", "Conv2dEncoder", "FrameEncoder", "encoder_for_shape",
           "default_model", "MidFusionClassifier", "mid_fusion_model"]


def default_model(data, fusion: str = "concat", feature_dim: int = 64, **kwargs) -> MultimodalClassifier:
    """A :class:`MultimodalClassifier` with default encoders for a dataset bundle.

    ``data`` is what :func:`modaldiag.datasets.load` / ``synthetic`` return (it knows the input
    shape of every modality and the number of classes). ``feature_dim`` (>= 1) is every
    encoder's output width; ``fusion`` and ``kwargs`` go to :class:`MultimodalClassifier`.
    """
    feature_dim = as_plain_int(feature_dim)
    validate_params({
        "data": [Satisfies(lambda d: all(hasattr(d, a) for a in ("input_shapes", "modalities",
                                                                 "num_classes")),
                           "a dataset bundle with .input_shapes, .modalities and .num_classes "
                           "(what md.datasets.load / synthetic / av_folder return)")],
        "feature_dim": [POSITIVE_INT]}, {"data": data, "feature_dim": feature_dim}, "default_model")
    shapes = data.input_shapes
    encoders = {m: encoder_for_shape(shapes[m], feature_dim) for m in data.modalities}
    return MultimodalClassifier(encoders, {m: feature_dim for m in data.modalities},
                                data.num_classes, fusion=fusion, **kwargs)
