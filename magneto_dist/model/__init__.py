"""Magneto-family models: decoder-only, encoder-only and encoder-decoder, every norm scheme."""
from .config import ModelConfig
from .flops import flops_per_token
from .init import InitWeights, deepnet_alpha_beta, magneto_gamma
from .models import MagnetoBert, MagnetoEncoderDecoder, MagnetoGPT, build_model, model_skeleton

__all__ = ["ModelConfig", "build_model", "model_skeleton", "InitWeights", "flops_per_token",
           "magneto_gamma", "deepnet_alpha_beta",
           "MagnetoGPT", "MagnetoBert", "MagnetoEncoderDecoder"]
