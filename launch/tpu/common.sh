# shellcheck shell=bash
# Shared by launch/tpu/*.sh (sourced, not run). Settings come from the environment:
#
#   TPU_NAME      name of the TPU VM (the node)                          (required)
#   ZONE          e.g. us-central2-b (v4), us-west4-a (v5e)              (required)
#   ACCELERATOR   accelerator type                                       (default v4-8)
#   RUNTIME       TPU software version     (default: the JAX base image of ACCELERATOR)
#   MODE          vm: `tpu-vm create` (fails at once without capacity)
#                 queued: a queued resource (waits in the queue for capacity)  (default vm)
#   PROVISIONING  on-demand | spot | reserved                            (default on-demand)
#   QR_NAME       name of the queued resource                    (default ${TPU_NAME}-qr)
#   PROJECT       gcloud project                         (default: gcloud's configured one)
#   REMOTE_DIR    code folder on every worker, relative to its home      (default s4jax)
#   VENV          virtual environment on every worker, relative to its home
#                                                                        (default s4jax-venv)
#   PYTHON        Python >= 3.11 on the workers (installed with apt if missing)
#                                                                        (default python3.11)
#   DRY_RUN=1     print every command (one line, shell-quoted, after "+ ") instead of
#                 running it; the slice's state is then read from FAKE_STATES (see below)

set -euo pipefail

LAUNCH_TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by setup.sh
REPO_ROOT="$(cd "$LAUNCH_TPU_DIR/../.." && pwd)"

die() {
  echo "launch/tpu: error: $*" >&2
  exit 2
}

require_settings() {
  [[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME, e.g. export TPU_NAME=s4jax-v4"
  [[ -n "${ZONE:-}" ]] || die "set ZONE, e.g. export ZONE=us-central2-b"
  ACCELERATOR="${ACCELERATOR:-v4-8}"
  MODE="${MODE:-vm}"
  PROVISIONING="${PROVISIONING:-on-demand}"
  QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
  REMOTE_DIR="${REMOTE_DIR:-s4jax}"
  VENV="${VENV:-s4jax-venv}"
  PYTHON="${PYTHON:-python3.11}"
  if [[ -z "${RUNTIME:-}" ]]; then
    # The base images for JAX (Cloud TPU's "TPU software versions" page).
    case "$ACCELERATOR" in
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      *) RUNTIME=tpu-ubuntu2204-base ;;
    esac
  fi
  case "$MODE" in vm | queued) ;; *) die "MODE=$MODE: use vm or queued" ;; esac
  case "$PROVISIONING" in
    on-demand | spot | reserved) ;;
    *) die "PROVISIONING=$PROVISIONING: use on-demand, spot or reserved" ;;
  esac
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    GCLOUD_FLAGS+=(--project="$PROJECT")
  fi
}

is_dry_run() {
  [[ "${DRY_RUN:-0}" == 1 ]]
}

# Runs a command, or prints it (shell-quoted, so `shlex.split` gives back the argv).
run() {
  if is_dry_run; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# The provisioning flag of `create` (none for on-demand).
provisioning_flags() {
  case "$PROVISIONING" in
    spot) echo --spot ;;
    reserved) echo --reserved ;;
    *) ;;
  esac
}

create_slice() {
  local extra
  extra="$(provisioning_flags)"
  if [[ "$MODE" == queued ]]; then
    # shellcheck disable=SC2086  # $extra is one flag or nothing
    run gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
      "${GCLOUD_FLAGS[@]}" $extra
  else
    # shellcheck disable=SC2086
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME" "${GCLOUD_FLAGS[@]}" $extra
  fi
}

delete_slice() {
  if [[ "$MODE" == queued ]]; then
    # --force deletes the queued resource's nodes too.
    run gcloud compute tpus queued-resources delete "$QR_NAME" --force --quiet \
      "${GCLOUD_FLAGS[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --quiet "${GCLOUD_FLAGS[@]}"
  fi
}

# Sets SLICE_STATE: the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE,
# SUSPENDING, SUSPENDED, FAILED, ...) or the TPU VM's (CREATING, READY, PREEMPTED,
# TERMINATED, ...); NOT_FOUND if there is none. In a dry run the states are taken in turn
# from FAKE_STATES (space-separated; the last one repeats), so tests can play a preemption.
FAKE_STATE_INDEX=0
describe_state() {
  local cmd
  if [[ "$MODE" == queued ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_FLAGS[@]}"
      --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
      --format='value(state)')
  fi
  if is_dry_run; then
    run "${cmd[@]}"
    local -a states
    read -r -a states <<<"${FAKE_STATES:-READY}"
    local i=$((FAKE_STATE_INDEX < ${#states[@]} ? FAKE_STATE_INDEX : ${#states[@]} - 1))
    SLICE_STATE="${states[$i]}"
    FAKE_STATE_INDEX=$((FAKE_STATE_INDEX + 1))
    echo "# state: $SLICE_STATE"
    return 0
  fi
  SLICE_STATE="$("${cmd[@]}" 2>/dev/null)" || SLICE_STATE=NOT_FOUND
  SLICE_STATE="${SLICE_STATE:-NOT_FOUND}"
}

# What a state means for the loop: ready, waiting (the queue or provisioning is under way),
# or gone (preempted, failed, deleted: the slice must be re-created).
state_kind() {
  case "$1" in
    ACTIVE | READY) echo ready ;;
    WAITING_FOR_RESOURCES | PROVISIONING | ACCEPTED | CREATING | STARTING | RESTARTING)
      echo waiting ;;
    *) echo gone ;;
  esac
}

# Waits until the slice is ready; returns 1 if it is gone instead (e.g. FAILED).
wait_ready() {
  local poll="${POLL_SECONDS:-60}"
  while true; do
    describe_state
    case "$(state_kind "$SLICE_STATE")" in
      ready) return 0 ;;
      gone) return 1 ;;
      *)
        echo "# $QR_NAME/$TPU_NAME is $SLICE_STATE; checking again in ${poll}s" >&2
        sleep "$poll"
        ;;
    esac
  done
}

# Runs a shell command line on every worker of the slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
    --command="$1"
}

# The command line every worker runs for training: the same on each (JAX finds the other
# workers of the slice itself with --distributed).
training_command() {
  local quoted=""
  local arg
  for arg in "$@"; do
    quoted+=" $(printf '%q' "$arg")"
  done
  echo "cd ~/$REMOTE_DIR && exec ~/$VENV/bin/python -m s4jax.main --distributed$quoted"
}

# Refuses training arguments that cannot work on a slice, with the reason.
check_training_args() {
  local arg workdir=""
  for arg in "$@"; do
    case "$arg" in
      --workdir=*) workdir="${arg#--workdir=}" ;;
      --distributed | --distributed=*) die "do not pass --distributed: the scripts add it" ;;
      *) ;;
    esac
  done
  [[ -n "$workdir" ]] || die "give --workdir=DIR (a folder every worker shares, e.g. a" \
    "gcsfuse mount of a bucket: GCS_BUCKET=... launch/tpu/setup.sh mounts one at /mnt/s4jax)"
  case "$workdir" in
    gs://*)
      local path="${workdir#gs://}"
      die "--workdir=$workdir: s4jax writes its workdir with plain file operations, so it" \
        "needs a mounted folder, not a gs:// URL. Mount the bucket on every worker" \
        "(GCS_BUCKET=${path%%/*} launch/tpu/setup.sh mounts it at /mnt/s4jax) and give" \
        "--workdir=/mnt/s4jax/${path#*/}"
      ;;
    *) ;;
  esac
}
