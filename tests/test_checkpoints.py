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
