#!/usr/bin/env bash
# Creates a Cloud TPU slice: a queued resource (default; waits until ACTIVE) or a plain TPU VM.
USAGE="usage: create.sh --project P --zone Z --accelerator-type T --runtime-version V --name N
                 [--mode queued|vm] [--spot] [--retry-sleep S] [--dry-run]

Creates the slice N: 'gcloud compute tpus queued-resources create' (--mode queued, the default; then
polls until the queued resource is ACTIVE) or 'gcloud compute tpus tpu-vm create' (--mode vm).
--spot asks for spot (preemptible) capacity. --dry-run prints the commands instead of running them.
Flags (or environment variables; see common.sh): KAT_PROJECT, KAT_ZONE, KAT_ACCELERATOR_TYPE, KAT_RUNTIME_VERSION, KAT_NAME, KAT_MODE,
KAT_SPOT=1, KAT_RETRY_SLEEP, KAT_DRY_RUN=1."
# shellcheck source=tpu_scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kat_parse_args "$USAGE" "$@"
kat_require project zone accelerator-type runtime-version name
kat_create
