#!/usr/bin/env bash
# Runs kat-jax train on every worker of a slice (one JAX process per host).
USAGE="usage: launch.sh --project P --zone Z --name N --config FILE.py[:VARIANT] --workdir gs://B/PATH
                 [--log PATH] [--dry-run] [-- --config.KEY=VALUE ...]

Runs 'kat-jax train --config C --workdir W [overrides]' on all workers through
'gcloud compute tpus tpu-vm ssh N --worker=all', output appended to --log on each worker (default
kat_train.log in the home directory; watch.sh shows it). A config FILE that exists here is first copied
to every worker (as ~/kat_FILE); otherwise it is taken as a path on the workers. Running again on the
same workdir resumes from its last checkpoint. Exits with the trainer's status (143: preempted, a
checkpoint was saved; retry.sh relaunches). Keep the terminal open (tmux), or use retry.sh.
--dry-run prints the commands instead of running them.
Flags (or environment variables; see common.sh): KAT_PROJECT, KAT_ZONE, KAT_NAME, KAT_CONFIG, KAT_WORKDIR, KAT_LOG, KAT_DRY_RUN=1."
# shellcheck source=tpu_scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kat_parse_args "$USAGE" "$@"
kat_require project zone name config workdir
[[ "$WORKDIR" == gs://* ]] || echo "launch.sh: warning: --workdir $WORKDIR is not gs://; on a multi-host slice every host needs the same workdir" >&2
kat_launch
