"""Shared fixtures: tiny random Hugging Face models built in the test (no download)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs reads this at import: without it every call probes the bucket type with real credentials.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One persistent compilation cache per test session, shared with the tests' subprocesses: runs
# that compile the same train step again (resume, reference runs) load it instead (CI time).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="kat_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

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


def saved_hf_models(tmp_path_factory, cases: dict):
    """name -> (directory, model) of the tiny random HF model ``cases[name]`` = (family, kwargs),
    built and saved on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            family, kwargs = cases[name]
            model = build_hf_model(family, **kwargs)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (str(path), model)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """name -> directory of a saved tiny random HF model (built once per session)."""
    return saved_hf_models(tmp_path_factory, HF_CASES)


# ---------------------------------------------------------------------------------------------
# gs:// without a network: a Cloud Storage emulator (gcp-storage-emulator) on 127.0.0.1, with
# tensorstore (orbax arrays), gcsfs (etils.epath) and google-cloud-storage (tensorboardX) pointed
# at it.


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    pytest.importorskip("gcsfs", reason="the gcs extra (gcsfs) is not installed")
    pytest.importorskip("gcp_storage_emulator.server")
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                          "gcs_emulator_main.py"), str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        pytest.fail("the Cloud Storage emulator (tests/gcs_emulator_main.py) did not start")

    class Emulator:
        def wipe(self, keep_buckets=False):
            q = "?keep-buckets=1" if keep_buckets else ""
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with no_proxy.open(f"{url}/wipe{q}", timeout=60) as r:
                assert r.status == 200

    srv = Emulator()
    env = {
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # tensorstore: a fixed token, no credentials
        "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
        "GOOGLE_CLOUD_PROJECT": "test",
        "FSSPEC_GS_TOKEN": "anon",  # the same for child processes (fsspec reads them at import)
        "FSSPEC_GS_USE_LISTINGS_CACHE": "false",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    import gcsfs

    old_conf = dict(fsspec.config.conf.get("gs", {}))
    # anonymous; no listing cache: objects written behind gcsfs's back (by tensorstore) must show
    fsspec.config.conf["gs"] = {**old_conf, "token": "anon", "use_listings_cache": False}
    gcsfs.GCSFileSystem.clear_instance_cache()
    # tensorboardX's GCS writer re-uploads in __del__, which runs at interpreter exit, after the
    # emulator is gone (120 s of retries); kat_jax stages TensorBoard files locally anyway.
    from tensorboardX import record_writer

    record_writer.GCSRecordWriter.__del__ = lambda self: None
    try:
        yield srv
    finally:
        proc.stdin.close()  # the emulator exits when its stdin closes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        fsspec.config.conf["gs"] = old_conf
        gcsfs.GCSFileSystem.clear_instance_cache()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """An empty gs://test-bucket for each test."""
    gcs_emulator.wipe(keep_buckets=True)
    return "gs://test-bucket"


def pytest_configure(config):
    config.addinivalue_line("markers", "docker_engine: needs a real Docker engine with the sandbox "
                            "image (tests/test_envs_docker_engine.py; skips with the reason otherwise)")
