# shellcheck shell=bash disable=SC2034
# (SC2034: some settings below are read only by the scripts that source this file)
# Shared flag/env parsing and gcloud helpers for the kat_jax Cloud TPU scripts (sourced, not run).
#
# Every parameter comes from a flag or from its environment variable; nothing is hard-coded:
#   --project P            KAT_PROJECT            Google Cloud project
#   --zone Z               KAT_ZONE               zone, e.g. us-east5-a
#   --accelerator-type T   KAT_ACCELERATOR_TYPE   e.g. v5p-64
#   --runtime-version V    KAT_RUNTIME_VERSION    TPU VM software version, e.g. v2-alpha-tpuv5
#   --name N               KAT_NAME               TPU (and queued resource) name
#   --config C             KAT_CONFIG             kat-jax config, FILE.py[:VARIANT]
#   --workdir W            KAT_WORKDIR            run directory, gs://BUCKET/PATH
#   --install SRC          KAT_INSTALL            git URL (git+https://...), wheel file, or gs:// wheel
#   --mode queued|vm       KAT_MODE               queued resources (default) or plain tpu-vm create
#   --spot                 KAT_SPOT=1             spot capacity (preemptible)
#   --log PATH             KAT_LOG                training log on each worker (default kat_train.log)
#   --max-retries N        KAT_MAX_RETRIES        retry.sh: relaunches after preemption (default 20)
#   --retry-sleep S        KAT_RETRY_SLEEP        seconds between state polls / retries (default 60)
#   --dry-run              KAT_DRY_RUN=1          print the commands ("+ CMD", one a line), run nothing
#   -- ARGS...                                    extra kat-jax train arguments (--config.KEY=VALUE)

set -euo pipefail

PROJECT="${KAT_PROJECT:-}"
ZONE="${KAT_ZONE:-}"
ACCELERATOR_TYPE="${KAT_ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${KAT_RUNTIME_VERSION:-}"
NAME="${KAT_NAME:-}"
CONFIG="${KAT_CONFIG:-}"
WORKDIR="${KAT_WORKDIR:-}"
INSTALL="${KAT_INSTALL:-}"
MODE="${KAT_MODE:-queued}"
SPOT="${KAT_SPOT:-0}"
LOG="${KAT_LOG:-kat_train.log}"
MAX_RETRIES="${KAT_MAX_RETRIES:-20}"
RETRY_SLEEP="${KAT_RETRY_SLEEP:-60}"
DRY_RUN="${KAT_DRY_RUN:-0}"
TAIL_LINES=50
FOLLOW=0
EXTRA_ARGS=()

kat_die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# kat_parse_args USAGE "$@": parses the flags above (--flag VALUE or --flag=VALUE); --help prints USAGE.
kat_parse_args() {
  local usage="$1"
  shift
  while (($#)); do
    local flag="$1" value="" has_value=0
    if [[ "$flag" == --*=* ]]; then
      value="${flag#*=}"
      flag="${flag%%=*}"
      has_value=1
    fi
    case "$flag" in
      -h | --help)
        printf '%s\n' "$usage"
        exit 0
        ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --spot) SPOT=1; shift; continue ;;
      --follow) FOLLOW=1; shift; continue ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      --project | --zone | --accelerator-type | --runtime-version | --name | --config | --workdir | \
        --install | --mode | --log | --max-retries | --retry-sleep | --lines) ;;
      *) kat_die "unknown argument: $1 (see --help)" ;;
    esac
    if ((!has_value)); then
      (($# >= 2)) || kat_die "$flag needs a value"
      value="$2"
      shift
    fi
    shift
    case "$flag" in
      --project) PROJECT="$value" ;;
      --zone) ZONE="$value" ;;
      --accelerator-type) ACCELERATOR_TYPE="$value" ;;
      --runtime-version) RUNTIME_VERSION="$value" ;;
      --name) NAME="$value" ;;
      --config) CONFIG="$value" ;;
      --workdir) WORKDIR="$value" ;;
      --install) INSTALL="$value" ;;
      --mode) MODE="$value" ;;
      --log) LOG="$value" ;;
      --max-retries) MAX_RETRIES="$value" ;;
      --retry-sleep) RETRY_SLEEP="$value" ;;
      --lines) TAIL_LINES="$value" ;;
    esac
  done
  [[ "$MODE" == queued || "$MODE" == vm ]] || kat_die "--mode must be queued or vm, not '$MODE'"
}

# kat_require NAME...: each of project zone accelerator-type runtime-version name config workdir install.
kat_require() {
  local key var
  for key in "$@"; do
    var="$(printf '%s' "${key//-/_}" | tr '[:lower:]' '[:upper:]')"  # bash 3.2 (macOS) has no ${v^^}
    [[ -n "${!var}" ]] || kat_die "missing --$key (or KAT_$var)"
  done
}

# kat_quote WORD...: the words as one shell-readable line (single quotes only where needed).
kat_quote() {
  local out="" w sq="'"
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
      out+=" $w"
    else
      out+=" '${w//$sq/$sq\\$sq$sq}'"
    fi
  done
  printf '%s\n' "${out# }"
}

# kat_run CMD...: runs CMD (echoed to stderr), or with --dry-run prints "+ CMD" to stdout.
kat_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(kat_quote "$@")"
    return 0
  fi
  echo "+ $(kat_quote "$@")" >&2
  "$@"
}

# --- the slice ------------------------------------------------------------------------------------

kat_create() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$MODE" == queued ]]; then
    kat_run gcloud compute tpus queued-resources create "$NAME" "--project=$PROJECT" "--zone=$ZONE" \
      "--node-id=$NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION" \
      ${spot[@]+"${spot[@]}"} || return
    kat_wait_active
  else
    kat_run gcloud compute tpus tpu-vm create "$NAME" "--project=$PROJECT" "--zone=$ZONE" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
  fi
}

kat_delete() {
  if [[ "$MODE" == queued ]]; then
    kat_run gcloud compute tpus queued-resources delete "$NAME" "--project=$PROJECT" "--zone=$ZONE" \
      --force --quiet
  else
    kat_run gcloud compute tpus tpu-vm delete "$NAME" "--project=$PROJECT" "--zone=$ZONE" --quiet
  fi
}

# kat_state: prints the slice's state (queued: ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ...;
# vm: READY, PREEMPTED, ...), or NOT_FOUND. With --dry-run prints the describe command instead.
kat_state() {
  local cmd
  if [[ "$MODE" == queued ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "--project=$PROJECT" "--zone=$ZONE"
      "--format=value(state.state)")
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "--project=$PROJECT" "--zone=$ZONE"
      "--format=value(state)")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    kat_run "${cmd[@]}"
    return 0
  fi
  local state
  state="$("${cmd[@]}" 2>/dev/null)" || state=NOT_FOUND
  echo "${state:-NOT_FOUND}"
}

kat_healthy() {
  [[ "$1" == ACTIVE || "$1" == READY ]]
}

# kat_wait_active: polls a queued resource until ACTIVE (fails on FAILED / SUSPENDED).
kat_wait_active() {
  if [[ "$DRY_RUN" == 1 ]]; then
    kat_state
    return 0
  fi
  local state
  while true; do
    state="$(kat_state)"
    echo "$NAME: $state" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | NOT_FOUND) echo "$NAME: queued resource is $state" >&2; return 1 ;;
    esac
    sleep "$RETRY_SLEEP"
  done
}

# --- the workers ----------------------------------------------------------------------------------

# kat_ssh WORKER REMOTE_COMMAND
kat_ssh() {
  kat_run gcloud compute tpus tpu-vm ssh "$NAME" "--project=$PROJECT" "--zone=$ZONE" "--worker=$1" \
    "--command=$2"
}

# kat_scp LOCAL_FILE REMOTE_PATH: to every worker.
kat_scp() {
  kat_run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "--project=$PROJECT" "--zone=$ZONE" --worker=all
}

# kat_setup: installs kat_jax[tpu] on every worker from INSTALL (git URL, local wheel, gs:// wheel).
kat_setup() {
  local pip="python3 -m pip install --upgrade" whl
  case "$INSTALL" in
    *.whl)
      whl="$(basename "$INSTALL")"
      if [[ "$INSTALL" == gs://* ]]; then
        kat_ssh all "gcloud storage cp $(kat_quote "$INSTALL") /tmp/$(kat_quote "$whl") && $pip $(kat_quote "/tmp/${whl}[tpu]")"
      else
        [[ "$DRY_RUN" == 1 || -f "$INSTALL" ]] || kat_die "--install: no such wheel: $INSTALL"
        kat_scp "$INSTALL" "/tmp/$whl" || return
        kat_ssh all "$pip $(kat_quote "/tmp/${whl}[tpu]")"
      fi
      ;;
    git+* | http://* | https://* | ssh://*)
      local url="$INSTALL"
      [[ "$url" == git+* ]] || url="git+$url"
      kat_ssh all "$pip $(kat_quote "kat_jax[tpu] @ $url")"
      ;;
    *) kat_die "--install must be a git URL, a .whl file or a gs:// .whl, not '$INSTALL'" ;;
  esac
}

# kat_launch: copies a local config file to every worker, then runs kat-jax train on all workers
# (output appended to LOG on each worker). Returns the remote exit status (143: preempted, resumable).
kat_launch() {
  local file="${CONFIG%%:*}" variant="" remote_config="$CONFIG"
  [[ "$CONFIG" == *:* ]] && variant=":${CONFIG#*:}"
  if [[ -f "$file" ]]; then
    remote_config="kat_$(basename "$file")$variant"
    kat_scp "$file" "kat_$(basename "$file")" || return
  fi
  local train
  train="$(kat_quote kat-jax train --config "$remote_config" --workdir "$WORKDIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})"
  # KAT_JAX_DISTRIBUTED=1: every worker joins jax.distributed (JAX finds the slice's hosts itself)
  kat_ssh all "set -o pipefail; KAT_JAX_DISTRIBUTED=1 $train 2>&1 | tee -a $(kat_quote "$LOG")"
}
