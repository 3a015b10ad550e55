#!/usr/bin/env bash
# Creates the TPU slice: a TPU VM (MODE=vm), or a queued resource (MODE=queued) that waits in
# Cloud TPU's queue until there is capacity; PROVISIONING=spot or reserved for those tiers.
# Returns once the slice is ready.
#
#   TPU_NAME=s4jax-v4 ZONE=us-central2-b ACCELERATOR=v4-8 launch/tpu/create.sh
#   TPU_NAME=s4jax-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 MODE=queued PROVISIONING=spot \
#       launch/tpu/create.sh
#
# Settings: see launch/tpu/common.sh; DRY_RUN=1 prints the commands instead.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require_settings
create_slice
wait_ready || die "the slice ${TPU_NAME} is $SLICE_STATE instead of ready; see" \
  "\`gcloud compute tpus queued-resources describe $QR_NAME --zone=$ZONE\` (MODE=queued) or" \
  "\`gcloud compute tpus tpu-vm describe $TPU_NAME --zone=$ZONE\`, then launch/tpu/delete.sh"
echo "# $TPU_NAME is $SLICE_STATE"
