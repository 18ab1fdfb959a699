#!/usr/bin/env bash
# Shows a slice's state and the end of the training log on worker 0.
USAGE="usage: watch.sh --project P --zone Z --name N [--mode queued|vm] [--log PATH] [--lines N]
                [--follow] [--dry-run]

Prints the slice's state (queued resource: ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...; tpu-vm:
READY, PREEMPTED, ...) and the last --lines (default 50) lines of the training log on worker 0 (the
process that logs metrics); --follow keeps following it (tail -F).
--dry-run prints the commands instead of running them.
Flags (or environment variables; see common.sh): KAT_PROJECT, KAT_ZONE, KAT_NAME, KAT_MODE, KAT_LOG, KAT_DRY_RUN=1."
# shellcheck source=tpu_scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
kat_parse_args "$USAGE" "$@"
kat_require project zone name
if [[ "$DRY_RUN" == 1 ]]; then
  kat_state
else
  echo "$NAME: $(kat_state)"
fi
tail_cmd=(tail -n "$TAIL_LINES")
[[ "$FOLLOW" == 1 ]] && tail_cmd+=(-F)
kat_ssh 0 "$(kat_quote "${tail_cmd[@]}" "$LOG")"
