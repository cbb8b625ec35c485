"""Magneto-family models: decoder-only, encoder-only and encoder-decoder, every norm scheme."""
from .config import ModelConfig
from .flops import flops_per_token
from .init import deepnet_alpha_beta, magneto_gamma
from .models import MagnetoBert, MagnetoEncoderDecoder, MagnetoGPT, build_model

__all__ = ["ModelConfig", "build_model", "flops_per_token", "magneto_gamma", "deepnet_alpha_beta",
           "MagnetoGPT", "MagnetoBert", "MagnetoEncoderDecoder"]
