"""Image–sentence retrieval on cached region features: the TERAN region–word alignment model and the VSE∞-style
dual encoder, sharing text encoders, pooling and the hinge triplet loss. See ``docs/retrieval.md``."""
from glied.models.retrieval.model import (MODELS, PRESETS, Embedding, RetrievalModel, TeranConfig, TeranModel,
                                          VseConfig, VseModel, build_retrieval_model, config_from_dict)
from glied.models.retrieval.score import hinge_triplet_loss, mrsw_scores

__all__ = ["MODELS", "PRESETS", "Embedding", "RetrievalModel", "TeranConfig", "TeranModel", "VseConfig",
           "VseModel", "build_retrieval_model", "config_from_dict", "hinge_triplet_loss", "mrsw_scores"]
