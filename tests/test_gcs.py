"""gs:// paths end to end against a Cloud Storage emulator on 127.0.0.1 (tests/conftest.py,
tests/gcs_emulator_main.py): the
storage helpers, and a training run whose workdir and data are on gs://, stopped and resumed
there, logging the losses of the same run on a local disk; its model loads from gs://."""

import json
import os

import numpy as np
import pytest

from kat_jax import storage
from kat_jax.training import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MID = os.path.join(ROOT, "configs", "mid_training.py")
DATA = os.path.join(ROOT, "kat_jax", "assets", "data", "mid_tool_use.jsonl")
FAST = ["--config.data.row_len=64", "--config.data.rows=2", "--config.data.trajectories=8",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2",
        "--config.train.steps=4", "--config.optimizer.warmup_steps=1", "--config.data.shards=2",
        # the emulator serves one request at a time: synchronous saves keep this test short
        # (asynchronous ones are tested locally)
        "--config.train.async_checkpointing=false"]


def test_storage_helpers_on_gs(gcs_bucket, tmp_path):
    base = f"{gcs_bucket}/h"
    storage.write_text(f"{base}/a/x.json", '{"a": 1}')
    storage.write_text(f"{base}/a/y.jsonl", "1\n")
    assert storage.read_text(f"{base}/a/x.json") == '{"a": 1}'
    assert storage.isfile(f"{base}/a/x.json") and not storage.isdir(f"{base}/a/x.json")
    assert storage.isdir(f"{base}/a") and not storage.isfile(f"{base}/a")
    assert sorted(storage.listdir(f"{base}/a")) == ["x.json", "y.jsonl"]
    assert storage.glob(f"{base}/a/*.jsonl") == [f"{base}/a/y.jsonl"]
    local = storage.local_copy(f"{base}/a/y.jsonl")
    assert not storage.is_remote(local) and open(local).read() == "1\n"
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "sub" / "f.txt").write_text("z")
    storage.upload_tree(str(tmp_path / "t"), f"{base}/up")
    assert storage.read_text(f"{base}/up/sub/f.txt") == "z"
    storage.rmtree(f"{base}/a")
    assert not storage.exists(f"{base}/a/x.json")
    storage.rmtree(f"{base}/absent")  # nothing to remove: no error
    with pytest.raises(ValueError, match=r"'\*\*' is not supported for remote paths"):
        storage.glob(f"{base}/**/*.jsonl")
    with pytest.raises(ValueError, match="not in the bucket"):
        storage.glob("gs://test-*/a.jsonl")


def _losses_text(text):
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if r}


def test_training_on_gs_stops_resumes_and_equals_a_local_run(gcs_bucket, tmp_path, monkeypatch):
    from kat_jax.models.checkpoint import load_model
    from kat_jax.training.trainer import Preempted, run_train

    monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would show up here
    storage.copy_file(DATA, f"{gcs_bucket}/data/mid.jsonl")
    gs_work = f"{gcs_bucket}/runs/mid"
    gs_cfg = FAST + [f"--config.data.train_files={gcs_bucket}/data/*.jsonl"]
    with pytest.raises(Preempted, match="train.stop_at_step at step 2"):
        run_train(config_lib.load_train_config(
            f"{MID}:tiny", gs_cfg + ["--config.train.stop_at_step=2"]), gs_work)
    assert sorted(_losses_text(storage.read_text(f"{gs_work}/metrics.jsonl"))) == [1, 2]
    out = run_train(config_lib.load_train_config(f"{MID}:tiny", gs_cfg), gs_work)
    assert out["step"] == 4 and out["workdir"] == gs_work

    local = tmp_path / "local"
    run_train(config_lib.load_train_config(f"{MID}:tiny", FAST + [f"--config.data.train_files={DATA}"]),
              str(local))
    got = _losses_text(storage.read_text(f"{gs_work}/metrics.jsonl"))
    want = _losses_text((local / "metrics.jsonl").read_text())
    assert got == want and len(set(want.values())) == 4  # bit-identical, step by step

    assert storage.isfile(f"{gs_work}/config.json")
    assert [n for n in storage.listdir(f"{gs_work}/tensorboard") if n.startswith("events.")]
    assert {"2", "4"} <= set(storage.listdir(f"{gs_work}/checkpoints"))
    model_gs, cfg = load_model(gs_work)  # the workdir stands for its model/
    model_local, _ = load_model(str(local))
    import jax
    from flax import nnx

    for a, b in zip(jax.tree.leaves(nnx.state(model_gs, nnx.Param)),
                    jax.tree.leaves(nnx.state(model_local, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert run_train(config_lib.load_train_config(f"{MID}:tiny", gs_cfg), gs_work)["status"] == \
        "already finished"
    assert sorted(os.listdir(tmp_path)) == ["local"]  # nothing written to a local "gs:" path


def test_remote_hugging_face_checkpoint_is_a_clear_error(gcs_bucket):
    from kat_jax.models.checkpoint import load_model_config

    storage.write_text(f"{gcs_bucket}/hf/config.json", "{}")
    with pytest.raises(ValueError, match="hf: a Hugging Face checkpoint must be a local directory"):
        load_model_config(f"{gcs_bucket}/hf")


def test_import_hf_to_gs_then_export_hf_from_gs(gcs_bucket, hf_dirs, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from kat_jax.cli import main

    path, hf = hf_dirs("qwen3_mha_tied")
    kat = f"{gcs_bucket}/models/q"
    assert main(["import-hf", path, kat]) == 0
    assert storage.isfile(f"{kat}/model_config.json") and storage.isdir(f"{kat}/params")
    assert main(["export-hf", kat, str(tmp_path / "out")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    sa, sb = hf.state_dict(), back.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert main(["export-hf", kat, f"{gcs_bucket}/hf_out"]) == 1
    assert "export-hf writes a local directory" in capsys.readouterr().err
