#!/usr/bin/env bash
# Keeps one training run going on spot (preemptible) capacity until it finishes:
#
#   1. makes sure the slice exists and is ready (creates it; re-creates it if preempted),
#   2. installs the code on it (setup.sh) after every (re-)creation,
#   3. runs the training command on every worker (train.sh),
#   4. if training ends without success: a slice that is gone (preempted, suspended, failed)
#      is deleted and re-created and the *same* command runs again, resuming from the
#      workdir; a failure on a healthy slice is retried up to MAX_FAILURES times in a row
#      (default 3), then the loop stops with training's exit status.
#
#   TPU_NAME=s4jax-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 MODE=queued PROVISIONING=spot \
#     launch/tpu/supervise.sh --config=configs/voc_unimatch.py \
#       --workdir=/mnt/s4jax/runs/voc92 --config.data.root=/mnt/s4jax/VOCdevkit/VOC2012
#
# Resuming relies on SIGTERM: when a spot VM is preempted its processes get SIGTERM; the
# training saves a checkpoint and exits, and the next attempt continues from it (at worst
# from the last periodic checkpoint). Run this loop where it can stay up for days (tmux on a
# small always-on VM or a workstation). DELETE_WHEN_DONE=1 deletes the slice after success.
# GCS_BUCKET / CODE / REPO_URL are passed on to setup.sh.
#
# Settings: see launch/tpu/common.sh. DRY_RUN=1 prints the commands instead; the slice's
# states then come from FAKE_STATES and training's exit statuses from FAKE_TRAIN_STATUS
# (space-separated lists, e.g. FAKE_STATES="READY PREEMPTED READY" FAKE_TRAIN_STATUS="255 0").

HERE="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"
# shellcheck source=SCRIPTDIR/setup.sh
source "$HERE/setup.sh"
# shellcheck source=SCRIPTDIR/train.sh
source "$HERE/train.sh"

FAKE_TRAIN_INDEX=0
# Training's exit status (the recorded ones in a dry run).
train_attempt() {
  local status=0
  train_on_slice "$@" || status=$?
  if is_dry_run; then
    local -a statuses
    read -r -a statuses <<<"${FAKE_TRAIN_STATUS:-0}"
    local i=$((FAKE_TRAIN_INDEX < ${#statuses[@]} ? FAKE_TRAIN_INDEX : ${#statuses[@]} - 1))
    status="${statuses[$i]}"
    FAKE_TRAIN_INDEX=$((FAKE_TRAIN_INDEX + 1))
    echo "# training exited with status $status"
  fi
  return "$status"
}

# Makes the slice ready: creates it if there is none, re-creates it if it is gone.
# Sets FRESH=1 if it (re-)created it. With an argument, that is the state just read.
ensure_slice() {
  FRESH=0
  local known="${1:-}"
  while true; do
    if [[ -n "$known" ]]; then
      SLICE_STATE="$known"
      known=""
    else
      describe_state
    fi
    case "$(state_kind "$SLICE_STATE")" in
      ready) return 0 ;;
      waiting)
        wait_ready && return 0
        ;;
      *) ;;
    esac
    if [[ "$SLICE_STATE" != NOT_FOUND ]]; then
      echo "# $TPU_NAME is $SLICE_STATE: deleting it to create it again" >&2
      delete_slice || true
    fi
    create_slice || true  # a refused request (no capacity) is retried below
    FRESH=1
    wait_ready && return 0
    echo "# the new slice is $SLICE_STATE; trying again in ${POLL_SECONDS:-60}s" >&2
    sleep "${POLL_SECONDS:-60}"
  done
}

main() {
  require_settings
  check_training_args "$@"
  local max_failures="${MAX_FAILURES:-3}"
  local failures=0 attempt=0 status first=1 known=""
  while true; do
    ensure_slice "$known"
    if [[ "$FRESH" == 1 || "$first" == 1 ]]; then
      setup_slice
      first=0
    fi
    attempt=$((attempt + 1))
    echo "# attempt $attempt: training on $TPU_NAME" >&2
    status=0
    train_attempt "$@" || status=$?
    if [[ "$status" == 0 ]]; then
      echo "# training finished (attempt $attempt)" >&2
      if [[ "${DELETE_WHEN_DONE:-0}" == 1 ]]; then
        delete_slice
      fi
      return 0
    fi
    describe_state
    known="$SLICE_STATE"
    if [[ "$(state_kind "$SLICE_STATE")" == ready ]]; then
      failures=$((failures + 1))
      if ((failures >= max_failures)); then
        echo "# training failed $failures times in a row on a healthy slice (status" \
          "$status); stopping. Its output above says why; the slice is kept." >&2
        return "$status"
      fi
      echo "# training failed (status $status) on a healthy slice; retrying" \
        "($failures/$max_failures)" >&2
    else
      failures=0
      echo "# $TPU_NAME is $SLICE_STATE (preempted?): re-creating it and resuming" >&2
    fi
    sleep "${POLL_SECONDS:-60}"
  done
}

main "$@"
