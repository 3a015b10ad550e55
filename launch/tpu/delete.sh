#!/usr/bin/env bash
# Deletes the slice (MODE=queued: the queued resource and its TPU VM). The workdir on the
# shared folder is kept.
#
#   TPU_NAME=s4jax-v4 ZONE=us-central2-b launch/tpu/delete.sh
#
# Settings: see launch/tpu/common.sh; DRY_RUN=1 prints the commands instead.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_settings
delete_slice
