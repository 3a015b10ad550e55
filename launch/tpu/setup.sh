#!/usr/bin/env bash
# Puts this code on every worker of the slice and installs it (pip install -e . plus
# jax[tpu]) in a virtual environment there; optionally mounts a Cloud Storage bucket as the
# shared workdir folder. Safe to run again (after a code change, or on a re-created slice).
#
#   launch/tpu/setup.sh              copies this checkout (tracked and untracked files that
#                                    git does not ignore) to every worker
#   CODE=clone REPO_URL=https://github.com/OWNER/s4jax.git GIT_REF=main launch/tpu/setup.sh
#                                    clones the repository on every worker instead
#   GCS_BUCKET=my-bucket launch/tpu/setup.sh
#                                    also mounts gs://my-bucket at MOUNT (default /mnt/s4jax)
#                                    on every worker with Cloud Storage FUSE
#
# Settings: see launch/tpu/common.sh; DRY_RUN=1 prints the commands instead.

# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

setup_slice() {
  local code="${CODE:-copy}"
  if [[ "$code" == copy ]]; then
    local tarball
    tarball="$(mktemp "${TMPDIR:-/tmp}/s4jax-code.XXXXXX")"
    if ! is_dry_run; then
      git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
        (cd "$REPO_ROOT" && tar --null -T - -czf "$tarball")
    else
      echo "# (the code archive: git ls-files --cached --others --exclude-standard | tar)"
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:s4jax-code.tar.gz" --worker=all \
      "${GCLOUD_FLAGS[@]}"
    rm -f "$tarball"
    on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf s4jax-code.tar.gz -C $REMOTE_DIR"
  elif [[ "$code" == clone ]]; then
    [[ -n "${REPO_URL:-}" ]] || die "CODE=clone needs REPO_URL=https://github.com/OWNER/s4jax.git"
    local ref="${GIT_REF:-main}"
    on_all_workers "rm -rf $REMOTE_DIR && git clone --depth=1 --branch=$ref $REPO_URL $REMOTE_DIR"
  else
    die "CODE=$code: use copy or clone"
  fi

  # Ubuntu 22.04 (the TPU images) ships Python 3.10; s4jax needs >= 3.11.
  local install
  install="set -e; if ! command -v $PYTHON >/dev/null; then"
  install+=" sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv; fi;"
  install+=" [ -x $VENV/bin/python ] || $PYTHON -m venv $VENV;"
  install+=" $VENV/bin/pip install -q --upgrade pip;"
  install+=" $VENV/bin/pip install -q -e ./$REMOTE_DIR 'jax[tpu]';"
  install+=" $VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
  on_all_workers "$install"

  if [[ -n "${GCS_BUCKET:-}" ]]; then
    local mount="${MOUNT:-/mnt/s4jax}"
    local fuse
    # Cloud Storage FUSE from Google's apt repository; directory renames (orbax finalises a
    # checkpoint by renaming its folder) need --rename-dir-limit.
    fuse="set -e; if ! command -v gcsfuse >/dev/null; then"
    fuse+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |"
    fuse+=" sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg;"
    fuse+=" echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg]"
    fuse+=" https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" |"
    fuse+=" sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;"
    fuse+=" sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi;"
    fuse+=" sudo mkdir -p $mount && sudo chown \$(id -u):\$(id -g) $mount;"
    fuse+=" mountpoint -q $mount || gcsfuse --implicit-dirs --rename-dir-limit=200000"
    fuse+=" $GCS_BUCKET $mount"
    on_all_workers "$fuse"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  require_settings
  setup_slice
fi
