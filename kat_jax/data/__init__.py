"""data: from files to trajectories to fixed-shape step batches.

Owns tokenizers (tokenizer: bytes and Hugging Face tokenizer.json), the Qwen chat rendering of
agent transcripts (chat), the rollout-record schema (records: read, validate, write), the JSONL
sources of the four stages and their validation (sources; seqio_source for seqio tasks), the grain
pipeline that packs groups into StepBatches per step (pipeline: record converters by data kind,
batchers, the checkpointable step iterator) and grouping rollouts for the pruner
(rollout_pruning).

May import: the root utilities (jsonl, storage, atomic_io), ops and trees. Never models, envs,
rollout, training or commands.
"""
