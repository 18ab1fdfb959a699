"""Default stage configs and size variants (the configs/*.py files are thin wrappers over these).

Every stage config has the same keys; the stage changes the data kind and the loss:

  stage                      mid | sft | rft | rl
  model.checkpoint           preset:NAME[@SEED], a kat_jax checkpoint, a Hugging Face directory, a
                             training workdir (its exported model), or stage:NAME (in a pipeline:
                             the model the named earlier stage ended with)
  model.dtype / param_dtype / remat_policy / attention_impl / attention_block_size
                             overrides of the checkpoint's model config ('' or 0: keep)
  tokenizer                  'bytes' (the tiny model's byte tokenizer), a tokenizer.json directory,
                             or '' (the checkpoint's own tokenizer.json)
  data.train_files           comma-separated JSONL paths or globs; 'pkg:' = bundled in kat_jax/assets
  data.eval_files            same, for the eval step ('' = no eval)
  data.rows / row_len / trajectories   one shard batch: rows x row_len tokens, trajectory slots
  data.shards                shard batches per microbatch (the global batch; a multiple of
                             mesh.data x mesh.fsdp; -1 = one per batch-parallel device group)
  data.shuffle / seed / epochs         epochs -1 = repeat forever (train.steps decides)
  train.steps / microbatches / checkpoint_every / log_every / eval_every / eval_batches
  train.keep_checkpoints / max_consecutive_skips / seed / async_checkpointing
  train.profile_start / profile_steps  a jax.profiler trace window (profile_steps 0 = off)
  train.log_entropy          compute the policy's entropy at the loss tokens and log its mean as
                             the `entropy` metric (every stage); False: the step computes no
                             entropy (a cheaper log-prob pass), which loss.entropy_coef > 0 needs
                             (then an error)
  train.stop_at_step         stop after this step as on preemption (checkpoint, exit 143; -1 = off)
  train.step_timeout_s       exit (75, with every thread's stack) when no step completes for this
                             long, so a stuck host fails a multi-host job instead of hanging it
                             (armed after the first step; <= 0 = off)
  optimizer.*                AdamW and its schedule (kat_jax.training.optim)
  loss.agg_mode              token-mean | seq-mean-token-mean | seq-mean-token-sum |
                             seq-mean-token-sum-norm (Dr. GRPO: token sums / the constant
                             data.row_len; kat_jax.training.losses)
  loss.temperature           the sampling temperature the log-probs are taken at
  loss.count_pruned_in_denominator   tokens removed by pruning count in the denominators (needs
                             pruning on the training path: an error until it is there)
  loss.old_logprobs          rft / rl: the old policy of the PPO ratio: 'behaviour' (the rollout's
                             own log-probs: the sampling policy), 'record' (each record's
                             'old_logprobs', e.g. recomputed by the trainer's policy; then a
                             truncated importance weight corrects behaviour vs old) or 'current'
                             (the policy being trained, before this update: ratio 1, so the clip
                             keys cannot act and must stay at their defaults; the truncated
                             importance weight against the behaviour log-probs does act)
  loss.eps_low / eps_high    PPO clip range [1 - eps_low, 1 + eps_high] of the ratio
  loss.dual_clip             bound -c A of the loss for negative advantages (0 = off)
  loss.tis_cap               truncated importance weight cap min(exp(old - behaviour), cap); needs
                             old_logprobs=record or current (0 = off)
  loss.tis_level             token: the weight above per token; sequence: one weight per
                             trajectory, min(exp(sum of its generated tokens' old - behaviour),
                             cap), given to each of its tokens (the exact correction of the
                             trajectory's probability, truncated); needs tis_cap > 0
  loss.behaviour_clip        a trust region around the behaviour (sampling) policy, on top of the
                             ratio's clip against the old policy: a token whose ratio to the
                             behaviour policy exp(logp - behaviour) has left [1 - c, 1 + c] in
                             its advantage's direction gets no gradient (PPO's clip anchored at
                             the sampler, as in asynchronous RL the old policy of
                             old_logprobs=record / current is newer than the sampler); needs
                             old_logprobs=record or current and ratio_level=token (0 = off)
  loss.kl_coef / kl_type     KL(pi || ref) penalty coefficient and estimator (k1, k2, k3); > 0
                             needs records with 'ref_logprobs'
  loss.entropy_coef          entropy bonus coefficient
  loss.ratio_level           token (PPO / GRPO) | sequence (GSPO: one length-normalised ratio per
                             trajectory, clipped per sequence) | sequence_token (GSPO-token: the
                             sequence ratio's value with per-token gradients)
  loss.log_ratio_clamp       log-ratios are clamped to +-this before exp (ratio, k3 KL; verl: 20)
  loss.kl_clamp              the k3 KL value is clamped to +-this (verl: 10); needs kl_coef > 0
                             and kl_type=k3
  loss.advantage_estimator   rl: how a group's rewards become advantages: grpo ((r - mean) /
                             unbiased std), drgrpo (r - mean: Dr. GRPO drops the std), rloo (r -
                             mean of the others); online by kat_jax.flow (TrajectoryManager),
                             offline by the data feed for records without an advantage
                             (kat_jax.data.pipeline)
  loss.algorithm             custom (the keys above act as set) | grpo | dapo | drgrpo | gspo |
                             rloo: a preset of the keys the paper uses (LOSS_ALGORITHMS below).
                             build.validate applies it (writing the effective keys into cfg.loss)
                             and build.loss_spec resolves it the same way: the preset fills every
                             key it names whose value is still its LOSS_DEFAULTS value; a key set
                             to anything else (on the command line, or by a variant: the pod rl /
                             rft variants' agg_mode) wins over the preset. A key set explicitly to
                             its default value cannot be told from an unset one (use custom). With
                             old_logprobs=current the ratio is 1, and the preset's clip keys
                             (eps_low, eps_high, dual_clip) are not filled.
  Policy keys (all but the first three) apply to rft and rl only; set on mid or sft they are
  errors, as is any key that could not act (kat_jax.training.build.validate).
  prune.budget               rft / rl: pruning on the training path: each group's prefix tree
                             goes through the entropy pruner (kat_jax.trees.pruning) and keeps at
                             most this many tokens per group; pruned tokens are not laid out (no
                             compute) and get no loss (0 = off). A budget below a group's shared
                             prompt is an error. Step metrics: tree_tokens, kept_tokens.
  prune.reach / keep_tags / fuse_tool_results   the pruner's PruneConfig (share | prob; tags
                             kept first, comma-separated; tool results fused with their call)
  rl.*                       the online loop (rl or rft stage, rl.env set): kat_jax.flow.online
                             says what each key does; set without rl.env they are errors (the
                             teacher keys act on rft only); rl.max_staleness /
                             rl.partial_rollouts: asynchronous sampling, kat_jax.flow.async_rollout
  rl.rollout_devices / lend_train_devices   rollout placement (kat_jax.flow.placement): the last
                             rollout_devices devices sample (a replica each) and the training mesh
                             (mesh.*) takes the rest; lend_train_devices: training devices also
                             sample while the trainer waits. Metrics placement/*
  rl.rollout_replica_devices  devices per sampler replica (default 1): k > 1 makes each replica
                             tensor-parallel over k devices (weights resharded device to device
                             onto the replica's tensor mesh, KV pool split over the KV heads), for
                             models larger than one device; must divide rl.rollout_devices (and
                             the training devices when lend_train_devices)
  rl.teacher_loss / teacher_coef   online rft: teachers in the loss. none: they only shape the
                             reward; sft: each group's teacher transcripts join its prefix tree
                             (chat-rendered like the rollouts, so they share the prompt) and the
                             objective becomes stage loss + teacher_coef x mean NLL of the
                             teachers' assistant tokens (their own token mean over the whole step,
                             whatever loss.agg_mode; no policy-gradient term on them; the rollouts'
                             advantages are computed without them); logged as teacher_nll.
                             off_policy (teachers as importance-weighted samples) is not
                             implemented: an error. sft needs prune.budget 0
  fleet.*                    where the online loop's environments run (kat_jax.flow.ray_fleet):
                             backend local (in this process) | ray (Ray actors placed by the
                             env:NAME custom resource, fleet.resource; warm pools, health checks,
                             episodes of a lost worker re-run up to fleet.max_retries, then
                             masked); set without rl.env they are errors
  mesh.data / fsdp / tensor  mesh axis sizes, -1 fills the rest; mesh.unsharded_tolerance
  mesh.context               splits each row's tokens over this many devices (context
                             parallelism, kat_jax.ops.context_parallel: q blocks balanced by live
                             block pairs, K / V all-gathered for attention); default 1. The rows'
                             attention blocks must split evenly (else an error names the key
                             when the step compiles); every mesh built from the config
                             (sharding.mesh_from_config: trainer, compile-check, online loop)
  mesh.topology_table        '' (default: mesh.* as set) or a variant name (the pod variants set
                             their own): on a Cloud TPU topology that TOPOLOGY_MESHES[name] lists
                             (the devices' kind and count, e.g. v6e-64: compile-check's
                             --topology, the trainer's jax.devices(): the same mesh on both) the
                             table's data / fsdp / context / tensor replace mesh.*, but only while
                             those four keys still hold the variant's own values (VARIANT_MESH):
                             a mesh axis set on the command line wins over the table. Other
                             topologies: mesh.* as set. An unknown name is an error naming the key
  distributed.*              jax.distributed.initialize arguments (multi-host): initialize,
                             coordinator_address HOST:PORT, num_processes, process_id (-1 / '' =
                             detect: Cloud TPU, SLURM), initialization_timeout_s, heartbeat_timeout_s
                             (a dead host stops the others after this long)

A global step holds train.microbatches x data.shards shard batches, whatever the mesh (so a run can
move between meshes and see the same batches).
"""

from __future__ import annotations

import ml_collections

STAGE_DATA = {
    "mid": "pkg:data/mid_tool_use.jsonl",
    "sft": "pkg:data/sft_trajectories.jsonl",
    "rft": "pkg:data/rl_rollouts.jsonl",
    "rl": "pkg:data/rl_rollouts.jsonl",
}

# variant -> (model preset, tokenizer, data shape, mesh, precision / memory) overrides
VARIANTS = ("tiny", "qwen3_0_6b", "qwen3_8b", "kat_dev_32b")


# loss.* defaults, the same for every stage (kat_jax.training.build.validate compares with them)
LOSS_DEFAULTS = dict(
    agg_mode="token-mean", temperature=1.0, count_pruned_in_denominator=False, eps_low=0.2,
    eps_high=0.28, dual_clip=3.0, tis_cap=0.0, tis_level="token", behaviour_clip=0.0,
    kl_coef=0.0, kl_type="k3", entropy_coef=0.0, old_logprobs="behaviour", ratio_level="token",
    log_ratio_clamp=20.0, kl_clamp=10.0, advantage_estimator="grpo", algorithm="custom")

# prune.*: pruning on the training path (kat_jax.data.pipeline, kat_jax.trees.pruning); rft / rl
PRUNE_DEFAULTS = dict(budget=0, reach="share", keep_tags="tool_call,tool_result,memory",
                      fuse_tool_results=True)

# fleet.*: the online loop's environments on Ray (kat_jax.flow.ray_fleet, which checks them)
FLEET_DEFAULTS = {
    "backend": "local",        # local | ray
    "address": "",             # a Ray cluster to join ('' = ray.init() here)
    "resource": "",            # "": env:<rl.env>
    "workers_per_host": 0,     # 0: the host's amount of the resource
    "max_retries": 2,
    "ping_timeout_s": 10.0,
    "call_timeout_s": 600.0,
    "acquire_timeout_s": 300.0,
}

# rl.*: the online loop (kat_jax.flow.online), rl stage with rl.env set
RL_DEFAULTS = dict(env="", tasks_file="", split="train", groups_per_round=8, group_size=4,
                   minibatches=1, epochs=1, max_turns=4, max_tokens=0, max_new_tokens=64,
                   temperature=1.0, concurrency=8, reference="", dynamic_sampling=False,
                   max_draws=4, overlong_filter=False,
                   # asynchronous RL (kat_jax.flow.async_rollout; issue 19's flow.max_staleness):
                   # sampling runs ahead of the trainer by at most max_staleness policy versions
                   # (0 = the synchronous loop); partial_rollouts: weight updates reach episodes
                   # in flight at their next model call instead of after a drain
                   max_staleness=0, partial_rollouts=False,
                   # rollout placement (kat_jax.flow.placement): rollout_devices > 0 samples on
                   # that many devices of their own (the last ones; one sampler replica each,
                   # weights copied device to device after each update) and trains on the rest;
                   # lend_train_devices: every training device also holds a replica that samples
                   # while the trainer waits for data (0 / False: one sampler time-shares them)
                   # rollout_replica_devices: devices per replica (tensor parallel when > 1)
                   rollout_devices=0, lend_train_devices=False, rollout_replica_devices=1,
                   # online rft: teachers ('' = the environment's bundled ones), the relative
                   # reward's weights, supervision during generation
                   teachers="", w_outcome=1.0, w_process=0.5, w_answer=0.5,
                   divergence_threshold=0.0, patience=1, on_terminate="mask",
                   termination_penalty=-1.0,
                   # online rft: teachers in the loss (none | sft; off_policy is reserved and
                   # an error) and the SFT term's coefficient
                   teacher_loss="none", teacher_coef=0.1)

# loss.algorithm presets: the loss keys each paper uses (resolve_loss applies them). None of these
# papers uses a dual clip (Ye et al. 2020), so each turns it off; KL is left as configured except
# where the paper drops it.
LOSS_ALGORITHMS: dict[str, dict] = {
    "custom": {},
    # GRPO (Shao et al. 2024, DeepSeekMath): symmetric clip 0.2, per-sequence mean of token means,
    # group-normalised advantages (r - mean) / std.
    "grpo": dict(eps_low=0.2, eps_high=0.2, dual_clip=0.0, agg_mode="seq-mean-token-mean",
                 ratio_level="token", advantage_estimator="grpo"),
    # DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28), token-level mean, no KL. Its dynamic
    # sampling and overlong filtering act on sampling, in the online loop, not in the loss.
    "dapo": dict(eps_low=0.2, eps_high=0.28, dual_clip=0.0, agg_mode="token-mean", kl_coef=0.0,
                 ratio_level="token", advantage_estimator="grpo"),
    # Dr. GRPO (Liu et al. 2025): token sums normalised by a constant length, no std division.
    "drgrpo": dict(eps_low=0.2, eps_high=0.2, dual_clip=0.0, agg_mode="seq-mean-token-sum-norm",
                   ratio_level="token", advantage_estimator="drgrpo"),
    # GSPO (Zheng et al. 2025): sequence-level ratio, clip range 3e-4 / 4e-4, sequence mean.
    "gspo": dict(eps_low=3e-4, eps_high=4e-4, dual_clip=0.0, agg_mode="seq-mean-token-mean",
                 ratio_level="sequence", advantage_estimator="grpo"),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline; the whole response is one action
    # (sum of its token log-probs), averaged over samples.
    "rloo": dict(eps_low=0.2, eps_high=0.2, dual_clip=0.0, agg_mode="seq-mean-token-sum",
                 ratio_level="token", advantage_estimator="rloo"),
}
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")  # loss.advantage_estimator (kat_jax.flow's)
CLIP_KEYS = ("eps_low", "eps_high", "dual_clip")  # act only when the ratio can differ from 1


def resolve_loss(loss: ml_collections.ConfigDict) -> tuple[dict, tuple[str, ...]]:
    """(effective loss keys, the keys the preset filled) of a loss config under its
    loss.algorithm: every key the preset names that is still at its LOSS_DEFAULTS value takes the
    preset's value (with old_logprobs=current, not the clip keys: the ratio is 1). Idempotent.
    An unknown algorithm is left for validate to report (nothing filled)."""
    out = {**LOSS_DEFAULTS, **loss.to_dict()}  # a config saved before a key existed: default
    preset = LOSS_ALGORITHMS.get(out.get("algorithm", "custom"), {})
    filled = []
    for key, value in preset.items():
        if out[key] == LOSS_DEFAULTS[key] and out[key] != value and not (
                key in CLIP_KEYS and out["old_logprobs"] == "current"):
            out[key] = value
            filled.append(key)
    return out, tuple(filled)


# Pod variants' mesh (data / fsdp / context / tensor; -1 fills the rest).
VARIANT_MESH: dict[str, dict[str, int]] = {
    "qwen3_0_6b": dict(data=1, fsdp=-1, context=1, tensor=1),
    "qwen3_8b": dict(data=1, fsdp=-1, context=1, tensor=1),
    "kat_dev_32b": dict(data=1, fsdp=-1, context=1, tensor=4),
}
# mesh.topology_table: variant -> Cloud TPU topology (tpu_topologies slice name) -> the mesh that
# fits there at the variant's row length, where VARIANT_MESH does not (or fits worse). Each row
# is compile-checked: benchmarks/compile_pods.py, benchmarks/RESULTS.md (compile_pods).
TOPOLOGY_MESHES: dict[str, dict[str, dict[str, int]]] = {
    "qwen3_0_6b": {},
    "qwen3_8b": {
        # 16 GiB chips, 16k-token rows: fsdp 16 asks for 17.85 GiB of temporaries, fsdp 4 x
        # tensor 4 compiles at 17.7 GiB; fsdp 2 x tensor 8 at 15.59 GiB (97%: a thin margin)
        "v5e-16": dict(data=1, fsdp=2, context=1, tensor=8),
    },
    # fsdp 8 / 16 x tensor 4 fits v5p-64 and v6e-64 at 32k-token rows (the layer carry split over
    # 'tensor': kat_jax.models.decoder.shard_layer_carry)
    "kat_dev_32b": {},
}
MESH_AXIS_KEYS = ("data", "fsdp", "context", "tensor")


def topology_mesh(mesh_cfg, topology: str | None) -> tuple[dict[str, int], str]:
    """(mesh axes {data, fsdp, context, tensor}, their source) for mesh config `mesh_cfg` on
    `topology` (a slice name such as 'v6e-64', or None when the devices are not a known TPU
    slice): TOPOLOGY_MESHES[mesh.topology_table][topology] when that row exists and mesh.*
    still hold VARIANT_MESH[mesh.topology_table] (source 'mesh.topology_table'), else mesh.* as
    set (source 'mesh.*'). ValueError naming mesh.topology_table for an unknown table."""
    axes = {k: int(mesh_cfg.get(k, 1 if k != "fsdp" else -1)) for k in MESH_AXIS_KEYS}
    name = mesh_cfg.get("topology_table", "") or ""
    if not name:
        return axes, "mesh.*"
    if name not in TOPOLOGY_MESHES:
        raise ValueError(f"mesh.topology_table={name!r}: not a table; known: "
                         f"{sorted(TOPOLOGY_MESHES)} or '' (off)")
    row = TOPOLOGY_MESHES[name].get(topology or "")
    if row is None or axes != VARIANT_MESH[name]:
        return axes, "mesh.*"
    return dict(row), "mesh.topology_table"


def base_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.model = ml_collections.ConfigDict(dict(
        checkpoint="preset:tiny", dtype="", param_dtype="", remat_policy="", attention_impl="",
        attention_block_size=0))
    c.tokenizer = "bytes"
    c.data = ml_collections.ConfigDict(dict(
        train_files=STAGE_DATA[stage], eval_files="", rows=2, row_len=2048, trajectories=8, shards=-1,
        shuffle=True, seed=0, epochs=-1))
    c.train = ml_collections.ConfigDict(dict(
        steps=40, microbatches=1, checkpoint_every=20, log_every=5, eval_every=0, eval_batches=2,
        keep_checkpoints=3, max_consecutive_skips=10, seed=0, async_checkpointing=True,
        profile_start=-1, profile_steps=0, stop_at_step=-1,
        step_timeout_s=3600.0, log_entropy=True))
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=4, schedule="cosine", final_lr_ratio=0.1, b1=0.9,
        b2=0.95, eps=1e-8, weight_decay=0.01, grad_clip=1.0))
    c.loss = ml_collections.ConfigDict(LOSS_DEFAULTS)
    c.prune = ml_collections.ConfigDict(PRUNE_DEFAULTS)
    c.rl = ml_collections.ConfigDict(RL_DEFAULTS)
    c.fleet = ml_collections.ConfigDict(FLEET_DEFAULTS)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1,
                                            unsharded_tolerance=0.02, topology_table=""))
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False, coordinator_address="", num_processes=-1, process_id=-1,
        initialization_timeout_s=300, heartbeat_timeout_s=100))
    return c


def stage_config(stage: str, variant: str | None = None) -> ml_collections.ConfigDict:
    variant = variant or "tiny"
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; known: {VARIANTS}")
    c = base_config(stage)
    if variant == "tiny":
        if stage == "mid":
            c.data.update(dict(rows=4, row_len=512, trajectories=16))
            c.train.update(dict(steps=60, checkpoint_every=30, log_every=10))
        elif stage == "sft":
            c.data.update(dict(rows=2, row_len=2048, trajectories=6))
            c.train.update(dict(steps=30, checkpoint_every=15, log_every=5))
        else:
            c.data.update(dict(rows=4, row_len=64, trajectories=16))
            c.train.update(dict(steps=30, checkpoint_every=15, log_every=5))
            c.optimizer.learning_rate = 1e-3
        if stage == "rft":
            # The bundled rollouts were sampled by a uniform policy (log-probs -log 512), far from
            # the SFT model: with that policy as the ratio's old policy every token of the
            # (negative, teacher-relative) advantages is clipped and nothing is learned. Offline
            # RFT here is one update per batch against the current policy, importance-weighted
            # against the behaviour log-probs.
            c.loss.update(dict(old_logprobs="current", tis_cap=2.0))
        return c
    # Pod variants: a real checkpoint is expected (override model.checkpoint with an HF or kat_jax
    # directory); preset:NAME initialises randomly, e.g. for compile checks and throughput tests.
    c.model.checkpoint = f"preset:{variant}"
    c.tokenizer = ""
    c.model.update(dict(dtype="bfloat16", param_dtype="float32", remat_policy="full",
                        attention_block_size=512))
    c.optimizer.update(dict(learning_rate=1e-5, warmup_steps=100, final_lr_ratio=0.1))
    c.train.update(dict(steps=2000, checkpoint_every=200, log_every=10, microbatches=4))
    c.mesh.update(dict(VARIANT_MESH[variant], topology_table=variant))
    if variant == "qwen3_0_6b":
        c.data.update(dict(rows=1, row_len=8192, trajectories=16))
    elif variant == "qwen3_8b":
        c.data.update(dict(rows=1, row_len=16384, trajectories=32))
    else:  # kat_dev_32b (Qwen3-32B shapes): 32k-token rows
        c.data.update(dict(rows=1, row_len=32768, trajectories=64))
    if stage in ("rft", "rl"):
        c.optimizer.learning_rate = 1e-6
        c.loss.agg_mode = "seq-mean-token-mean"
    return c


def pipeline_config(stages: list[tuple[str, ml_collections.ConfigDict]]) -> ml_collections.ConfigDict:
    """A config that runs stages in order, each in WORKDIR/<name>; `stages` is the order."""
    c = ml_collections.ConfigDict()
    c.stages = ",".join(name for name, _ in stages)
    for name, cfg in stages:
        c[name] = cfg
    return c
