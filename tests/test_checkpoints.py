"""import-hf / export-hf: exact round trips through transformers, sharded files, clear errors that
leave nothing half-written."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_model
from safetensors.numpy import load_file, save_file

from kat_jax.cli import main
from kat_jax.models.checkpoint import load_model
from kat_jax.models.decoder import chain_inputs


def _state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("case", ["qwen3_gqa2_untied_hd24", "qwen2_mha_tied"])
def test_import_export_round_trip_gives_identical_transformers_tensors(case, hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf = hf_dirs(case)
    kat, out = tmp_path / "kat", tmp_path / "hf_out"
    assert main(["import-hf", path, str(kat)]) == 0
    assert (kat / "model_config.json").exists() and (kat / "params").is_dir()
    assert main(["export-hf", str(kat), str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(hf)
    _state_dicts_equal(hf, reloaded)
    # Keys beyond the shapes survive the round trip (kept from the original config.json).
    original = json.loads((open(os.path.join(path, "config.json"))).read())
    exported = json.loads((out / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "rms_norm_eps", "tie_word_embeddings"):
        assert exported.get(key) == original.get(key), key


def test_bfloat16_checkpoint_imports_exactly(tmp_path):
    """A bf16 Hugging Face checkpoint (as published) is stored in bf16 and computes the same
    logits as transformers on the same bf16-rounded weights (compared in float32)."""
    hf = build_hf_model("qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    src = tmp_path / "src"
    hf.to(torch.bfloat16).save_pretrained(src)
    kat = tmp_path / "kat"
    assert main(["import-hf", str(src), str(kat)]) == 0
    cfg = json.loads((kat / "model_config.json").read_text())
    assert cfg["param_dtype"] == "bfloat16"
    model, _ = load_model(str(kat), dtype="float32")
    assert model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ids = np.arange(2, 30, dtype=np.int32)
    from transformers import AutoModelForCausalLM

    # A fresh float32 transformers model on the bf16 weights (casting `hf` back would also round
    # its RoPE inverse-frequency buffer).
    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids)[None]).logits[0].numpy()
    t = jnp.asarray(ids)[None]
    ours = np.asarray(model.logits(model(t, *chain_inputs(t))))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_import_holds_one_host_copy_of_the_model(tmp_path):
    """Peak traced host memory of import-hf stays well under two copies of the parameters."""
    import tracemalloc

    from kat_jax.models.checkpoint import import_hf

    hf = build_hf_model("qwen3", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        vocab_size=2048)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    model_bytes = sum(p.numel() * 4 for p in hf.parameters())
    tracemalloc.start()
    try:
        import_hf(str(src), str(tmp_path / "kat"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model_bytes < peak < 1.5 * model_bytes, (peak, model_bytes)


def test_sharded_checkpoints_import_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = build_hf_model("qwen2", num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=False)
    src = tmp_path / "src"
    hf.save_pretrained(src, max_shard_size="60KB")
    assert (src / "model.safetensors.index.json").exists()
    kat = tmp_path / "kat"
    assert main(["import-hf", str(src), str(kat)]) == 0
    # Loading the HF dir directly and the imported checkpoint give the same model.
    m1, _ = load_model(str(src))
    m2, _ = load_model(str(kat))
    t = jnp.asarray(np.arange(9, dtype=np.int32)[None])
    np.testing.assert_array_equal(np.asarray(m1(t, *chain_inputs(t))),
                                  np.asarray(m2(t, *chain_inputs(t))))
    out = tmp_path / "out"
    assert main(["export-hf", str(kat), str(out), "--max-shard-gb", str(60e3 / 2**30)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _state_dicts_equal(hf, AutoModelForCausalLM.from_pretrained(out))


def test_export_to_bfloat16_is_loadable(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf = hf_dirs("qwen3_mha_tied")
    assert main(["export-hf", path, str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    w = m.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.bfloat16
    ref = hf.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w, ref.to(torch.bfloat16))


def _copy_hf(path, dst):
    dst.mkdir()
    for name in os.listdir(path):
        (dst / name).write_bytes((open(os.path.join(path, name), "rb")).read())
    return dst


def test_missing_tensor_is_named_and_nothing_is_written(hf_dirs, tmp_path, capsys):
    path, _ = hf_dirs("qwen3_mha_tied")
    bad = _copy_hf(path, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    out = tmp_path / "out"
    assert main(["import-hf", str(bad), str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "missing" in err
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith("out")] == []


def test_misshaped_tensor_is_named(hf_dirs, tmp_path, capsys):
    path, _ = hf_dirs("qwen3_mha_tied")
    bad = _copy_hf(path, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
        "model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, bad / "model.safetensors")
    assert main(["import-hf", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.k_proj.weight" in err and "shape" in err
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_a_clear_error(hf_dirs, tmp_path, capsys):
    path, _ = hf_dirs("qwen3_mha_tied")
    bad = _copy_hf(path, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MixtralForCausalLM"], "mixtral"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["import-hf", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "MixtralForCausalLM" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_directory_is_not_overwritten(hf_dirs, tmp_path, capsys):
    path, _ = hf_dirs("qwen3_mha_tied")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["import-hf", path, str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
