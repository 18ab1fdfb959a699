#!/usr/bin/env bash
# Deletes a slice (the queued resource and its TPU VMs, or the TPU VM).
USAGE="usage: teardown.sh --project P --zone Z --name N [--mode queued|vm] [--dry-run]

Deletes the slice N: 'gcloud compute tpus queued-resources delete N --force' (--mode queued, the
default; also deletes its TPU VMs) or 'gcloud compute tpus tpu-vm delete N' (--mode vm). The workdir on
gs:// is kept. --dry-run prints the commands instead of running them.
Flags (or environment variables; see common.sh): KAT_PROJECT, KAT_ZONE, KAT_NAME, KAT_MODE, KAT_DRY_RUN=1."
# shellcheck source=tpu_scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kat_parse_args "$USAGE" "$@"
kat_require project zone name
kat_delete
