"""Shared fixtures: tiny random Hugging Face models built in the test (no download)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

HF_CASES = {
    # name: (family, kwargs)
    "qwen3_gqa2_untied_hd24": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=24, tie_word_embeddings=False,
                                             rope_theta=5000.0)),
    "qwen3_mha_tied": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                     tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "qwen2_gqa4_untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1,
                                        tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2_mha_tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4,
                                     tie_word_embeddings=True, rope_theta=250.0)),
}


def build_hf_model(family: str, seed: int = 0, **kwargs):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                max_position_embeddings=512, rms_norm_eps=1e-6)
    base.update(kwargs)
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**base))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**base))
    # Random init leaves norms at 1 and biases at 0: perturb them so the test can see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """name -> directory of a saved tiny random HF model (built once per session)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            family, kwargs = HF_CASES[name]
            model = build_hf_model(family, **kwargs)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (str(path), model)
        return cache[name]

    return get
