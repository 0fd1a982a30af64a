# Sourced by scripts/container-image and scripts/container-test.
#
# buildah re-executes itself from a sealed memfd copy of its own binary
# (containers/storage's unshare code). On this kernel the seal now and then
# fails with EBUSY ("Close_Fd sealing memfd copy: Device or resource busy",
# then "Error: exit status 1") before any work is done: it failed one CI run
# on the leftovers check. That failure is retried (up to 3 attempts, with the
# error shown); any other failure is returned as it is.

BUILDAH_MEMFD_ERROR='sealing memfd copy'

_buildah_once() {
  if declare -F as_root >/dev/null; then as_root buildah "$@"; else buildah "$@"; fi
}

# buildah_retry ARGS...: `buildah ARGS...` (through the caller's `as_root`
# when it has one), again when it failed only because the re-exec seal did.
# Its standard output passes through unchanged.
buildah_retry() {
  local err attempt rc
  err=$(mktemp)
  for attempt in 1 2 3; do
    rc=0
    # stderr is shown as it comes (a relay's log lines) and kept to look
    # at; stdout passes through on fd 3. A plain pipeline, so it has ended
    # when its status is read (a process substitution's `$!` is not set
    # when the command is a function such as as_root).
    { _buildah_once "$@" 2>&1 1>&3 3>&- | tee "$err" >&2; rc=${PIPESTATUS[0]}; } 3>&1 || true
    if [ "$rc" -eq 0 ] || ! grep -q "$BUILDAH_MEMFD_ERROR" "$err" || [ "$attempt" -eq 3 ]; then
      rm -f "$err"
      return "$rc"
    fi
    echo "buildah: the re-exec seal failed (attempt $attempt of 3, a known kernel race); trying again" >&2
    sleep 1
  done
}
