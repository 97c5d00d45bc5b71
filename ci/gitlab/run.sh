#!/usr/bin/env bash
# run.sh SCRIPT STAGE (run_exec): run one stage's script on the job's
# instance. A script that fails is the build's failure; Hangar's own (exit
# status 125 of hangar run, or no lease) is the system's.
. "$(dirname "$0")/hangar.env"
lease=$(cat "$HANGAR_STATE/job-$CUSTOM_ENV_CI_JOB_ID") || exit "$SYSTEM_FAILURE_EXIT_CODE"
script=$(cat "$1") || exit "$SYSTEM_FAILURE_EXIT_CODE"
# In the background, so that a cancel's SIGTERM reaches hangar run, which
# then ends the lease, and the command with it.
hangar run -q --lease "$lease" -- bash -c "$script" &
pid=$!
stopped=""
trap 'stopped=1; kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
code=$?
if [ -n "$stopped" ]; then
	wait "$pid"
	code=$?
fi
case $code in
0) exit 0 ;;
125) exit "$SYSTEM_FAILURE_EXIT_CODE" ;; # Hangar's own failure
*)
	if [ -n "${BUILD_EXIT_CODE_FILE:-}" ]; then echo "$code" >"$BUILD_EXIT_CODE_FILE"; fi
	exit "$BUILD_FAILURE_EXIT_CODE"
	;;
esac
