#!/usr/bin/env bash
# cleanup.sh (cleanup_exec): give the instance back, after every job,
# failed, cancelled or not. Use `hangar release --discard` to give every job
# a fresh instance.
. "$(dirname "$0")/hangar.env"
state=$HANGAR_STATE/job-$CUSTOM_ENV_CI_JOB_ID
[ -f "$state" ] || exit 0
# The runner never retries a cleanup: forget the lease either way (one not
# released ends when its TTL runs out).
hangar release "$(cat "$state")"
code=$?
rm -f "$state"
exit "$code"
