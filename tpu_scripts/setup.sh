#!/usr/bin/env bash
# Installs kat_jax with the tpu extra on every worker of a slice.
USAGE="usage: setup.sh --project P --zone Z --name N --install SRC [--mode queued|vm] [--dry-run]

Installs kat_jax[tpu] on all workers (gcloud compute tpus tpu-vm ssh --worker=all). SRC is
  a git URL          git+https://github.com/OWNER/kat_jax.git[@REF] (https:// gets git+ prepended)
  a local wheel      dist/kat_jax-0.1.0-py3-none-any.whl (copied to /tmp on every worker first)
  a gs:// wheel      gs://BUCKET/kat_jax-0.1.0-py3-none-any.whl (fetched by every worker)
--dry-run prints the commands instead of running them.
Flags (or environment variables; see common.sh): KAT_PROJECT, KAT_ZONE, KAT_NAME, KAT_INSTALL, KAT_DRY_RUN=1."
# shellcheck source=tpu_scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kat_parse_args "$USAGE" "$@"
kat_require project zone name install
kat_setup
