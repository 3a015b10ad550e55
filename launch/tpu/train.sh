#!/usr/bin/env bash
# Runs one training command on every worker of the slice at once: the arguments are passed
# to `python -m s4jax.main --distributed` unchanged. The workdir must be a folder every worker
# shares (a gcsfuse mount of a bucket, see setup.sh, or an NFS / Filestore mount), and so
# must the dataset (data.root) unless each worker has its own copy.
#
#   launch/tpu/train.sh --config=configs/voc_unimatch.py --workdir=/mnt/s4jax/runs/voc92 \
#       --config.data.root=/mnt/s4jax/VOCdevkit/VOC2012 --config.data.split=92
#
# Rerunning the same command resumes the run from its workdir. The output of every worker
# comes back here; the run stops if this terminal's connection drops, so start long runs in
# tmux (or use supervise.sh there).
#
# Settings: see launch/tpu/common.sh; DRY_RUN=1 prints the commands instead.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

train_on_slice() {
  check_training_args "$@"
  on_all_workers "$(training_command "$@")"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  require_settings
  train_on_slice "$@"
fi
