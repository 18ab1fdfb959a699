"""Sampler throughput (JSON, issue 23 part 6): the prefix cache over a multi-turn episode and a
group, and decode speed of the built-in engine (kat_jax.rollout.sampler.JaxEngine).

multi_turn: a scripted 20-turn episode (generation of --new-tokens per turn, then a scripted tool
  result of 50-500 tokens, --quick: 50-150): tokens prefilled over the episode vs its distinct
  tokens (target <= 1.05x), and the wall time with the prefix cache vs without it (prefix_cache
  False: every turn re-prefills the whole conversation, as the sampler did before), same run.
  prefill_over_minimal: tokens prefilled over the fewest possible (every token fed once: the
  distinct tokens less those the decode loop fed); partial_block_tokens, the difference, is what the
  partly filled last cache block costs (the prefix tree holds whole blocks only, so each turn
  re-prefills its context's last partial block).
group: 8 episodes x 8 turns sharing a prompt, run concurrently (continuous batching): tokens
  prefilled vs the distinct tokens of the 8 trajectories (their prefix trie).
decode: tokens/s at batch 1, 8, 32 (tokens of the decode chunks / their wall time, compile
  excluded) for the tiny model and a ~100M Qwen3-shaped model; step_over_forward = the time of one
  decode step of batch B (the on-device loop, divided by its steps) over one forward of B new tokens
  of one row against a cache of the same length (the prefill program), both called directly.
  bandwidth_fraction: the bytes one decode step must read (all parameters + the rows' live keys and
  values) / that step's measured time, over the host memory bandwidth measured in the same run
  (host_bandwidth: the best of a large array sum (read) and a scale (read + write)); 1.0 would be a
  decode step bound by memory bandwidth alone.
peer: Tunix's sampler (google-tunix in a separate environment, TUNIX_PYTHON; the runner is
  benchmarks/sampler_tunix_peer.py) on the same weights (exported as a Hugging Face directory:
  the issue's d256 two-layer model by default, --peer-model qwen3_100m the ~100M one): greedy, batch 1
  (512-token prompt), 8 and 32 (128-token prompts), --peer-tokens new tokens (batch 1:
  --peer-tokens-b1); each side timed end to end (prefill + decode) after a first (compiling)
  call with the same prompts, in --peer-reps rounds that alternate one Tunix call (its runner
  stays alive between rounds) with one kat_jax call, so both meet the same moments of a shared
  machine's load; the best of each side counts: kat_over_tunix is the ratio of generated tokens
  per second (kat_over_tunix_median_round: the median of the rounds' ratios); the tokens are
  compared. Without Tunix the JSON records why.
peer_episodes (not in the default --sections): the multi-turn (1 x 20 turns) and group (8 x 8
  turns, one prompt) episodes against Tunix on the --peer-model weights, greedy, scripted tool
  results of 50-500 tokens (--quick: 50-150): kat_jax's engine keeps the conversation's cache
  between turns, Tunix's sampler is called with the whole conversation each turn; each side
  times the second of two runs of the same shapes; kat_over_tunix = Tunix's seconds / kat_jax's
  (target >= 2).

    python benchmarks/sampler_throughput.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time

MODELS = {
    "tiny": dict(preset="tiny", overrides=dict(max_position_embeddings=16384)),
    "qwen3_100m": dict(preset="qwen3_0_6b", overrides=dict(
        hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
        intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True,
        max_position_embeddings=8192, param_dtype="float32", dtype="float32")),
    # the peer model: d256, two layers, MLP 768, 4 / 2 heads of 64, vocabulary 512
    "d256": dict(preset="tiny", overrides=dict(
        hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=768, vocab_size=512, tie_word_embeddings=True,
        max_position_embeddings=8192, param_dtype="float32", dtype="float32")),
}
TUNIX_PYTHON = os.environ.get("TUNIX_PYTHON", "/tmp/tunix-venv/bin/python")


def make_engine(name: str, **config):
    from kat_jax.models.config import get_preset
    from kat_jax.models.decoder import init_model
    from kat_jax.rollout.sampler import EngineConfig, JaxEngine

    spec = MODELS[name]
    cfg = get_preset(spec["preset"], **spec["overrides"])
    return JaxEngine(init_model(cfg, seed=0), EngineConfig(**config))


def distinct(seqs: list[list[int]]) -> int:
    nodes: dict[tuple[int, int], int] = {}
    for s in seqs:
        node = 0
        for t in s:
            node = nodes.setdefault((node, t), len(nodes) + 1)
    return len(nodes)


def episode(eng, rng, prompt_len, turns, new_tokens, tool_range, seed, lengths_seed=7):
    """One scripted episode; returns (its final tokens (what the model fed: the last generated
    token of the last turn excluded), the tokens the decode loop fed: all generated tokens but
    each turn's last). The tool results' lengths come from lengths_seed, their contents from rng:
    episodes of one lengths_seed have the same shapes (a warm-up compiles the timed run's)."""
    import numpy as np

    from kat_jax.rollout.sampler import SamplingParams

    sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    lengths = np.random.default_rng(lengths_seed).integers(*tool_range, turns)
    tokens = rng.integers(0, 256, prompt_len).tolist()
    decoded = 0
    for turn in range(turns):
        gen = eng.generate([tokens], sp, seeds=[seed * 1000 + turn])[0][0]
        tokens = tokens + gen.tokens
        decoded += len(gen.tokens) - 1
        if turn < turns - 1:
            tokens += rng.integers(0, 256, int(lengths[turn])).tolist()
    return tokens[:-1], decoded


def multi_turn(args) -> dict:
    import numpy as np

    out = {}
    for cached in (True, False):
        eng = make_engine("tiny", prefix_cache=cached, cache_tokens=32768)
        run = lambda s: episode(eng, np.random.default_rng(s), args.prompt_len, 20,
                                args.new_tokens, args.tool_range, s)
        run(0)  # compile every shape (the same lengths as the timed run)
        before = eng.stats["prefill_tokens"]
        t0 = time.perf_counter()
        tokens, decoded = run(1)
        seconds = time.perf_counter() - t0
        if cached:
            prefilled = eng.stats["prefill_tokens"] - before
            minimal = len(tokens) - decoded
            out.update(prefill_tokens=prefilled, distinct_tokens=len(tokens),
                       minimal_prefill_tokens=minimal, partial_block_tokens=prefilled - minimal,
                       prefill_over_minimal=round(prefilled / minimal, 3),
                       block_size=eng.config.block_size, seconds=round(seconds, 3))
        else:
            out.update(prefill_tokens_without_cache=eng.stats["prefill_tokens"] - before,
                       seconds_without_cache=round(seconds, 3))
    out["prefill_over_distinct"] = round(out["prefill_tokens"] / out["distinct_tokens"], 3)
    out["speedup"] = round(out["seconds_without_cache"] / out["seconds"], 2)
    return out


def group(args) -> dict:
    import numpy as np

    eng = make_engine("tiny", cache_tokens=32768)  # multi_turn's pool: shared programs
    prompt = np.random.default_rng(5).integers(0, 256, args.prompt_len).tolist()
    finals: dict[int, list[int]] = {}

    def one(i):
        from kat_jax.rollout.sampler import SamplingParams

        rng = np.random.default_rng(100 + i)
        sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
        tokens = list(prompt)
        for turn in range(8):
            tokens += eng.generate([tokens], sp, seeds=[i * 1000 + turn])[0][0].tokens
            if turn < 7:
                tokens += rng.integers(0, 256, int(rng.integers(*args.tool_range))).tolist()
        finals[i] = tokens[:-1]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = distinct(list(finals.values()))
    return {"prefill_tokens": eng.stats["prefill_tokens"], "distinct_tokens": n,
            "prefill_over_distinct": round(eng.stats["prefill_tokens"] / n, 3),
            "total_tokens": sum(map(len, finals.values())),
            "seconds_with_compile": round(time.perf_counter() - t0, 2)}


def step_and_forward(eng, batch: int, cache_len: int, reps: int) -> tuple[float, float]:
    """(seconds of one decode step of `batch` rows over a cache of cache_len (rows advance
    chunk_steps positions from there), seconds of one forward of `batch` new tokens of one row
    after a cache of cache_len), best of reps direct program calls."""
    import jax
    import numpy as np

    from kat_jax.trees.packing import bucket_length

    bs, steps = eng.config.block_size, eng.config.chunk_steps
    # table widths as the engine buckets them (its compiled programs are reused): a decode
    # chunk's reads up to cache_len + steps, the forward's context cache_len + batch
    m = bucket_length(-(-(cache_len + steps) // bs), minimum=1)
    m_fwd = bucket_length(-(-(cache_len + batch) // bs), minimum=1)
    tables = np.zeros((batch, max(m, m_fwd)), np.int32)
    for r in range(batch):  # distinct blocks per row, as live sequences have
        tables[r] = 1 + (r * tables.shape[1] + np.arange(tables.shape[1])) % (eng.num_blocks - 1)
    z = np.zeros(batch, np.int32)
    ones = np.ones(batch, np.float32)
    # the rows' state (tok, pos, step, left, active) where the engine keeps it between chunks,
    # so that this is the engine's compiled decode program, not a second one
    state = lambda: jax.device_put(
        (z, np.full(batch, cache_len, np.int32), z, np.full(batch, 10**6, np.int32),
         np.ones(batch, bool)), eng._state_sharding)
    dec_args = lambda: (lambda tok, pos, step, left, active: (
        eng.params, eng._layer_states, eng._pool, tables[:, :m], tok, pos,
        np.zeros((batch, 2), np.uint32), step, left, active, np.full((batch, 1), -1, np.int32),
        ones * 0, ones, z, 0, steps))(*state())
    t1 = 1
    fwd_args = lambda: (eng.params, eng._layer_states, eng._pool,
                        np.zeros((1, batch), np.int32),
                        (cache_len + np.arange(batch, dtype=np.int32))[None],
                        np.ones((1, batch), bool), tables[:1, :m_fwd],
                        np.full(1, batch - 1, np.int32),
                        np.zeros(t1, np.int32), np.zeros(t1, np.int32), np.zeros(t1, np.int32),
                        np.zeros((t1, 2), np.uint32), np.zeros(t1, np.int32),
                        np.zeros(t1, np.float32), np.ones(t1, np.float32),
                        np.zeros(t1, np.int32), 0)

    def timed(fn, make):
        best = float("inf")
        for _ in range(reps + 1):  # the first call compiles
            t0 = time.perf_counter()
            out = fn(*make())
            jax.block_until_ready(out)
            eng._pool = out[0]
            best = min(best, time.perf_counter() - t0)
        return best

    step = timed(eng._decode, dec_args) / steps
    fwd = timed(eng._prefill, fwd_args)
    return step, fwd


def host_bandwidth(mib: int = 256, reps: int = 5) -> dict:
    """Host memory bandwidth in GB/s: a float32 array of `mib` MiB summed (bytes read / time) and
    scaled (bytes read + written / time), best of reps; `GBps` is the larger."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(mib * 2**20 // 4, jnp.float32)
    out = {}
    for name, fn, moved in (("read", jax.jit(jnp.sum), 1), ("copy", jax.jit(lambda a: a * 2.0), 2)):
        jax.block_until_ready(fn(x))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_GBps"] = round(moved * x.nbytes / best / 1e9, 2)
    out["GBps"] = max(out["read_GBps"], out["copy_GBps"])
    return out


def step_bytes(eng, batch: int, cache_len: int) -> int:
    """Bytes a decode step of `batch` rows at cache_len (+ half a chunk) must read: every parameter
    once and the rows' live keys and values of every layer."""
    import jax

    params = sum(x.nbytes for x in jax.tree.leaves(eng.params))
    cfg = eng.cfg
    itemsize = eng._pool[0][0].dtype.itemsize
    live = cache_len + 1 + eng.config.chunk_steps // 2
    kv = batch * live * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
    return params + kv


def decode(args, bandwidth: dict) -> list[dict]:
    import numpy as np

    from kat_jax.rollout.sampler import SamplingParams

    out = []
    for name in args.models.split(","):
        eng = make_engine(name, cache_tokens=32 * (args.decode_prompt + args.decode_tokens) + 256,
                          max_batch=32)
        rng = np.random.default_rng(0)
        sp = SamplingParams(temperature=0.0, max_new_tokens=args.decode_tokens)
        for b in args.batches:
            prompts = [rng.integers(0, 256, args.decode_prompt).tolist() for _ in range(b)]
            eng.generate(prompts, sp, seeds=list(range(b)))  # compile
            prompts = [rng.integers(0, 256, args.decode_prompt).tolist() for _ in range(b)]
            s0, t0 = eng.stats["decode_seconds"], eng.stats["decode_tokens"]
            eng.generate(prompts, sp, seeds=list(range(b)))
            tps = (eng.stats["decode_tokens"] - t0) / (eng.stats["decode_seconds"] - s0)
            step, fwd = step_and_forward(eng, b, args.decode_prompt, args.reps)
            nbytes = step_bytes(eng, b, args.decode_prompt)
            out.append({"model": name, "batch": b, "prompt_len": args.decode_prompt,
                        "new_tokens": args.decode_tokens, "tokens_per_s": round(tps, 1),
                        "step_over_forward": round(step / fwd, 3),
                        "step_ms": round(step * 1e3, 3), "step_bytes": nbytes,
                        "step_GBps": round(nbytes / step / 1e9, 2),
                        "bandwidth_fraction": round(nbytes / step / 1e9 / bandwidth["GBps"], 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def _export_hf(name: str, out_dir: str) -> None:
    """The benchmark's model `name` (make_engine's weights: init_model seed 0) as a Hugging Face
    directory (config.json + model.safetensors)."""
    from kat_jax.models.checkpoint import params_to_pure_dict
    from kat_jax.models.config import get_preset, to_hf_config
    from kat_jax.models.decoder import init_model
    from kat_jax.models.hf_io import write_hf_safetensors

    spec = MODELS[name]
    cfg = get_preset(spec["preset"], **spec["overrides"])
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg), f)
    write_hf_safetensors(params_to_pure_dict(init_model(cfg, seed=0)), cfg, out_dir)


def _tunix_missing() -> str:
    """Why Tunix cannot run here ('' when it can)."""
    if not os.path.exists(TUNIX_PYTHON):
        return (f"{TUNIX_PYTHON} not found: create it with `python3 -m venv /tmp/tunix-venv && "
                "/tmp/tunix-venv/bin/pip install google-tunix==0.1.7 jax==0.10.2`")
    r = subprocess.run([TUNIX_PYTHON, "-c", "import tunix"], capture_output=True, text=True)
    return "import tunix failed: " + r.stderr[-300:] if r.returncode else ""


def _tunix_command(args, cases: list[dict], tmp: str, out: str, *flags: str) -> list[str]:
    """The Tunix runner's command line on `cases`, after writing them and the --peer-model
    weights (a Hugging Face directory) into tmp."""
    _export_hf(args.peer_model, tmp)
    with open(os.path.join(tmp, "cases.json"), "w") as f:
        json.dump(cases, f)
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sampler_tunix_peer.py")
    return [TUNIX_PYTHON, runner, "--hf-dir", tmp, "--cases", os.path.join(tmp, "cases.json"),
            "--out", out, *flags]


def _run_tunix(args, cases: list[dict], *flags: str) -> tuple[dict | None, str, float]:
    """The Tunix runner (sampler_tunix_peer.py, in TUNIX_PYTHON) on `cases` with the
    --peer-model weights exported as a Hugging Face directory: (its JSON output, '', seconds),
    or (None, why not, 0) when Tunix is missing or the runner fails."""
    import tempfile

    why = _tunix_missing()
    if why:
        return None, why, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = _tunix_command(args, cases, tmp, os.path.join(tmp, "out.json"), *flags)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout)
        seconds = time.perf_counter() - t0
        if r.returncode:
            return None, "the Tunix runner failed: " + r.stderr[-600:], 0.0
        with open(os.path.join(tmp, "out.json")) as f:
            return json.load(f), "", seconds


class _TunixInterleaved:
    """The Tunix runner in --interleave mode (a live subprocess holding its compiled samplers):
    run(i) times one call of case i there, so the caller can alternate with its own calls."""

    def __init__(self, args, cases: list[dict], *flags: str):
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(
            _tunix_command(args, cases, self.tmp.name, os.devnull, "--interleave", *flags),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.header = None
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.header = json.loads(line[6:])
                break
        if self.header is None:
            raise RuntimeError("the Tunix runner failed: " + self.proc.stderr.read()[-600:])

    def run(self, i: int) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the Tunix runner died: " + self.proc.stderr.read()[-600:])
        got = json.loads(line)
        return got["seconds"], got["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.tmp.cleanup()


def peer(args) -> dict:
    """kat_jax and Tunix side by side on the same weights and prompts (module docstring): per
    case, both compiled first, then --peer-reps rounds each timing one Tunix call (in its live
    subprocess) and then one kat_jax call, so both sides meet the same load; the best of each
    side counts, and the median of the rounds' ratios is reported beside it."""

    import numpy as np

    from kat_jax.rollout.sampler import SamplingParams

    name = args.peer_model
    last = MODELS[name]["overrides"]["vocab_size"] - 1   # Tunix's pad and eos id in the runner
    rng = np.random.default_rng(11)
    cases = [{"name": f"batch{b}", "prompts": rng.integers(1, 256, (b, p)).tolist(),
              "new_tokens": new}
             for b, p, new in ((1, 512, args.peer_tokens_b1), (8, 128, args.peer_tokens),
                               (32, 128, args.peer_tokens))]
    why = _tunix_missing()
    if why:
        return {"available": False, "reason": why}
    t0 = time.perf_counter()
    try:
        tunix = _TunixInterleaved(args, cases,
                                  *(["--logprobs"] if args.peer_logprobs else []))
    except RuntimeError as e:
        return {"available": False, "reason": str(e)}
    eng = make_engine(name, prefix_cache=False, max_batch=32,
                      cache_tokens=32 * (128 + args.peer_tokens) + 512 + args.peer_tokens_b1 + 64)
    out = {"available": True, "model": name, "tunix_logprobs": args.peer_logprobs,
           "interleaved": True, "rounds": args.peer_reps,
           "tunix_version": tunix.header["tunix_version"], "tunix_jax": tunix.header["jax"],
           "cases": []}
    try:
        for i, case in enumerate(cases):
            sp = SamplingParams(temperature=0.0, max_new_tokens=case["new_tokens"],
                                stop_tokens=(last,))
            eng.generate(case["prompts"], sp)  # compile
            ours_s, theirs_s = [], []
            for _ in range(args.peer_reps):
                seconds, tun_tokens = tunix.run(i)
                theirs_s.append(seconds)
                t1 = time.perf_counter()
                gens = eng.generate(case["prompts"], sp)
                ours_s.append(time.perf_counter() - t1)
            ours = [g[0].tokens for g in gens]
            kat_tps = sum(map(len, ours)) / min(ours_s)
            tun_tps = sum(map(len, tun_tokens)) / min(theirs_s)
            agree = [next((j for j, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
                     / max(len(o), len(t)) for o, t in zip(ours, tun_tokens)]
            out["cases"].append({
                "case": case["name"], "batch": len(case["prompts"]),
                "prompt_len": len(case["prompts"][0]), "new_tokens": case["new_tokens"],
                "kat_seconds": round(min(ours_s), 4), "tunix_seconds": round(min(theirs_s), 4),
                "kat_tokens_per_s": round(kat_tps, 1), "tunix_tokens_per_s": round(tun_tps, 1),
                "kat_over_tunix": round(kat_tps / tun_tps, 2),
                "kat_over_tunix_median_round": round(float(np.median(
                    [t / k for t, k in zip(theirs_s, ours_s)])), 2),
                "same_tokens": ours == tun_tokens,
                "agreeing_prefix_fraction": round(float(np.mean(agree)), 3)})
            print(json.dumps(out["cases"][-1]), flush=True)
    finally:
        tunix.close()
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _episode_cases(args) -> list[dict]:
    """The peer's episode workloads: multi_turn (one episode of 20 turns, tool results of
    --tool-range tokens) and group (8 episodes of 8 turns sharing one prompt, their own tool
    results); each with a warm-up twin of the same shapes and other contents."""
    import numpy as np

    rng = np.random.default_rng(23)
    cases = []
    for name, batch, turns in (("multi_turn", 1, 20), ("group", 8, 8)):
        lens = rng.integers(*args.tool_range, (batch, turns - 1)).tolist()
        for phase in ("warm", "timed"):
            prompt = rng.integers(1, 256, args.prompt_len).tolist()
            cases.append({"name": f"{name}_{phase}", "kind": "episodes", "turns": turns,
                          "new_tokens": args.new_tokens, "prompts": [prompt] * batch,
                          "tools": [[rng.integers(1, 256, n).tolist() for n in row]
                                    for row in lens]})
    return cases


def _kat_episodes(eng, case: dict, sp) -> tuple[list[list[int]], float]:
    """The runner's episode loop with kat_jax's engine (prefix cache on): per turn one generate
    call for all the case's episodes, then each episode's scripted tool result."""
    contexts = [list(p) for p in case["prompts"]]
    generated = [[] for _ in contexts]
    turn_seconds = []
    t0 = time.perf_counter()
    for turn in range(case["turns"]):
        t1 = time.perf_counter()
        gens = eng.generate(contexts, sp)
        for i, g in enumerate(gens):
            contexts[i] += g[0].tokens
            generated[i] += g[0].tokens
            if turn < case["turns"] - 1:
                contexts[i] += case["tools"][i][turn]
        turn_seconds.append(round(time.perf_counter() - t1, 3))
    return generated, time.perf_counter() - t0, turn_seconds


def peer_episodes(args) -> dict:
    """Multi-turn and group episodes, kat_jax (prefix cache) vs Tunix (each turn a new sampler
    call over the whole conversation: Tunix's sampler keeps no cache between calls), greedy, the
    same weights and scripted tool results; each side times the second of two runs of the same
    shapes (the first, other contents, compiles). The issue's target: kat_jax >= 2x."""

    from kat_jax.rollout.sampler import SamplingParams

    name = args.peer_model
    last = MODELS[name]["overrides"]["vocab_size"] - 1
    cases = _episode_cases(args)
    theirs, why, _ = _run_tunix(args, cases)
    if theirs is None:
        return {"available": False, "reason": why}
    theirs = {c["name"]: c for c in theirs["cases"]}
    eng = make_engine(name, prefix_cache=True, max_batch=32, cache_tokens=65536)
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, stop_tokens=(last,))
    out = {"available": True, "model": name, "new_tokens_per_turn": args.new_tokens,
           "prompt_len": args.prompt_len, "tool_range": list(args.tool_range), "cases": []}
    for case in cases:
        before = eng.stats["prefill_tokens"]
        ours, seconds, turn_seconds = _kat_episodes(eng, case, sp)
        if not case["name"].endswith("_timed"):
            continue
        tun = theirs[case["name"]]
        gen = sum(map(len, ours))
        out["cases"].append({
            "case": case["name"][:-len("_timed")], "episodes": len(case["prompts"]),
            "turns": case["turns"], "generated_tokens": gen,
            "kat_prefill_tokens": eng.stats["prefill_tokens"] - before,
            "tunix_prompt_tokens": tun["prompt_tokens"],
            "kat_seconds": round(seconds, 3), "tunix_seconds": tun["seconds"],
            "kat_over_tunix": round(tun["seconds"] / seconds, 2),
            "same_tokens": ours == tun["tokens"],
            "kat_turn_seconds": turn_seconds, "tunix_turn_seconds": tun["turn_seconds"]})
        print(json.dumps(out["cases"][-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,qwen3_100m")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32, help="per turn (multi_turn, group)")
    ap.add_argument("--prompt-len", type=int, default=256, help="episode prompt (multi_turn, group)")
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peer-tokens", type=int, default=128, help="peer: new tokens at batch 8, 32")
    ap.add_argument("--peer-tokens-b1", type=int, default=128, help="peer: new tokens at batch 1")
    ap.add_argument("--peer-model", default="d256", choices=["qwen3_100m", "d256"],
                    help="peer: the model both sides run (d256: the issue's two-layer d256 "
                    "Qwen3, on which its starting figures were measured)")
    ap.add_argument("--peer-reps", type=int, default=5,
                    help="peer: alternating rounds of one timed call each side (best counts)")
    ap.add_argument("--peer-logprobs", action="store_true",
                    help="peer: Tunix also returns per-token log-probs (return_logprobs=True), "
                    "as kat_jax's engine always does (with entropies)")
    ap.add_argument("--peer-timeout", type=int, default=1800, help="seconds for the Tunix run")
    ap.add_argument("--sections", default="multi_turn,group,decode,peer")
    ap.add_argument("--quick", action="store_true",
                    help="CPU-sized: tool results of 50-150 tokens, 16 new tokens per turn, 32 "
                    "decode tokens, 32 peer tokens, one timed repetition")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "sampler_throughput.json"))
    args = ap.parse_args()
    args.tool_range = (50, 501)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.tool_range, args.new_tokens, args.decode_tokens = (50, 151), 16, 32
        args.peer_tokens = args.peer_tokens_b1 = 32
        args.reps, args.peer_reps = 1, 1
    t0 = time.time()
    out = {"benchmark": "sampler_throughput", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus",
           "load_before": os.getloadavg()[0], "quick": args.quick,
           "host_bandwidth": host_bandwidth(), "section_seconds": {}}
    sections = {"multi_turn": lambda: multi_turn(args), "group": lambda: group(args),
                "decode": lambda: decode(args, out["host_bandwidth"]), "peer": lambda: peer(args),
                "peer_episodes": lambda: peer_episodes(args)}
    for name in args.sections.split(","):
        t1 = time.time()
        out[name] = sections[name]()
        out["section_seconds"][name] = round(time.time() - t1, 1)
        print(json.dumps({name: out[name]}), flush=True)
    out["load_after"] = os.getloadavg()[0]
    out["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
