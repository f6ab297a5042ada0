"""Qwen3-VL configurations pigg builds without downloading anything.

`qwen3_vl_8b_config()` is Qwen3-VL-8B-Instruct's architecture (for meta-device parameter counts
and GPU benchmarks with random weights); `tiny_qwen3_vl_config()` is a model small enough to
train on two CPU cores while keeping every structural feature (deepstack, mrope, merger), for the
tests; `demo_qwen3_vl_config()` is the demo's, a little larger, which learns where things are.
"""
from transformers import Qwen3VLConfig

SPECIAL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)


def qwen3_vl_8b_config() -> Qwen3VLConfig:
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000,
                             "mrope_interleaved": True, "mrope_section": [24, 20, 20]},
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        tie_word_embeddings=False,
        **SPECIAL_IDS,
    )


def tiny_qwen3_vl_config() -> Qwen3VLConfig:
    # Constraints: num_position_embeddings a perfect square, sum(mrope_section) == head_dim / 2,
    # deepstack indexes < vision depth. The vocabulary stays real so the real tokenizer fits.
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000,
                             "mrope_interleaved": True, "mrope_section": [4, 2, 2]},
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
            deepstack_visual_indexes=[1],
        ),
        tie_word_embeddings=False,
        **SPECIAL_IDS,
    )


def demo_qwen3_vl_config() -> Qwen3VLConfig:
    """`pigg demo`'s model: the tiny one with a 4-layer, 128-wide language model of head size 32 and a
    rotary base of 100 instead of 5,000,000. With head size 16 and Qwen's base, the rotations of the image
    rows and columns (6 of each on the demo's screens) hardly differ; with these, a random model learns
    to find the named block (issue 24's probes: the 2-layer, 64-wide model never left the prior)."""
    config = tiny_qwen3_vl_config()
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 128, 256, 4
    text.num_attention_heads = text.num_key_value_heads = 4
    text.head_dim = 32
    text.rope_parameters = {"rope_type": "default", "rope_theta": 100.0, "mrope_interleaved": True,
                            "mrope_section": [8, 4, 4]}
    config.vision_config.out_hidden_size = 128
    return config
