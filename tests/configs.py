"""Model configs for tests and benchmarks (kept out of the package: no user needs them)."""

from __future__ import annotations

from typing import Any

from cogvlm.config import CogVLMConfig, CrossVisionConfig, VisionConfig


def tiny_test_config(**overrides: Any) -> CogVLMConfig:
    """A few-thousand-parameter config with every structural feature of the real one, for tests."""
    vision_args = dict(image_size=28, patch_size=14, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64)
    vision_args.update(overrides.pop("vision", {}))
    vision = VisionConfig(**vision_args)
    if "cross_vision" in overrides:  # a dict of CrossVisionConfig overrides: a tiny CogAgent
        cross_args = dict(image_size=56, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=40,
                          head_size=24)
        cross_args.update(overrides.pop("cross_vision"))
        overrides.update(cross_vision=CrossVisionConfig(**cross_args), cross_compute_hidden_size=32)
    base: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                                num_heads=4, max_position_embeddings=256, vision=vision)
    base.update(overrides)
    return CogVLMConfig(**base)
