# Sourced by scripts/container-image and scripts/container-test.
#
# buildah re-executes itself from a sealed memfd copy of its own binary
# (containers/storage's unshare code). On this kernel the seal now and then
# fails with EBUSY ("Close_Fd sealing memfd copy: Device or resource busy",
# then "Error: exit status 1") before any work is done: it failed one CI run
# on the leftovers check. That failure is retried (up to 3 attempts, with the
# error shown); any other failure is returned as it is.

BUILDAH_MEMFD_ERROR='sealing memfd copy'

# buildah_retry ARGS...: `buildah ARGS...` (through the caller's `as_root`
# when it has one), again when it failed only because the re-exec seal did.
# Its standard output passes through unchanged.
buildah_retry() {
  local err attempt rc
  err=$(mktemp)
  for attempt in 1 2 3; do
    rc=0
    # stderr is shown as it comes (a relay's log lines) and kept to look at.
    if declare -F as_root >/dev/null; then as_root buildah "$@" 2> >(tee "$err" >&2) || rc=$?
    else buildah "$@" 2> >(tee "$err" >&2) || rc=$?; fi
    wait $! 2>/dev/null || true
    if [ "$rc" -eq 0 ] || ! grep -q "$BUILDAH_MEMFD_ERROR" "$err" || [ "$attempt" -eq 3 ]; then
      rm -f "$err"
      return "$rc"
    fi
    echo "buildah: the re-exec seal failed (attempt $attempt of 3, a known kernel race); trying again" >&2
    sleep 1
  done
}
