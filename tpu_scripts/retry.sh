#!/usr/bin/env bash
# Keeps a training run going through preemptions: recreate the slice, reinstall, relaunch, resume.
USAGE="usage: retry.sh --project P --zone Z --accelerator-type T --runtime-version V --name N
                --install SRC --config FILE.py[:VARIANT] --workdir gs://B/PATH
                [--mode queued|vm] [--spot] [--max-retries N] [--retry-sleep S] [--log PATH]
                [--dry-run] [-- --config.KEY=VALUE ...]

Loop: if the slice is missing or not healthy (not ACTIVE / READY: preempted, suspended, failed), delete
what is left of it, create it again (create.sh) and install kat_jax (setup.sh); then launch the run
(launch.sh). The trainer resumes from the last checkpoint in the workdir. A run that exits 0 ends the
loop; exit 143 (SIGTERM: preempted, checkpoint saved) or any failure while the slice is no longer healthy
is retried, at most --max-retries times (default 20), --retry-sleep seconds apart (default 60); any
other failure on a healthy slice ends the loop with its status.
--dry-run prints the commands of one pass (slice taken as missing, run as succeeding).
Flags (or environment variables; see common.sh): every KAT_* of create.sh, setup.sh and launch.sh, KAT_MAX_RETRIES, KAT_RETRY_SLEEP."
# shellcheck source=tpu_scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kat_parse_args "$USAGE" "$@"
kat_require project zone accelerator-type runtime-version name install config workdir

retries=0
while true; do
  if [[ "$DRY_RUN" == 1 ]]; then
    kat_state
    state=NOT_FOUND
  else
    state="$(kat_state)"
    echo "retry.sh: $NAME is $state" >&2
  fi
  if ! kat_healthy "$state"; then
    [[ "$state" == NOT_FOUND ]] || kat_delete || true
    rc=0
    { kat_create && kat_setup; } || rc=$?
    if ((rc != 0)); then
      retries=$((retries + 1))
      ((retries <= MAX_RETRIES)) || kat_die "giving up after $MAX_RETRIES retries (create/setup failed: $rc)"
      echo "retry.sh: create/setup failed ($rc); retry $retries/$MAX_RETRIES in $RETRY_SLEEP s" >&2
      sleep "$RETRY_SLEEP"
      continue
    fi
  fi
  rc=0
  kat_launch || rc=$?
  ((rc == 0)) && exit 0
  state="$(kat_state)"
  if ((rc == 143)) || ! kat_healthy "$state"; then
    retries=$((retries + 1))
    ((retries <= MAX_RETRIES)) || kat_die "giving up after $MAX_RETRIES retries (last exit $rc, slice $state)"
    echo "retry.sh: run exited $rc, slice $state (preempted); retry $retries/$MAX_RETRIES in $RETRY_SLEEP s" >&2
    sleep "$RETRY_SLEEP"
    continue
  fi
  echo "retry.sh: run failed with exit $rc on a healthy slice; not retrying" >&2
  exit "$rc"
done
