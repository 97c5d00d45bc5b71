#!/usr/bin/env bash
# prepare.sh (prepare_exec): lease an instance for the job. Every stage of
# the job then runs on that lease (run.sh), so the checkout stays on the
# instance; cleanup.sh gives it back.
set -euo pipefail
. "$(dirname "$0")/hangar.env"
mkdir -p "$HANGAR_STATE"
state=$HANGAR_STATE/job-$CUSTOM_ENV_CI_JOB_ID
# The job id as client token: a retried prepare gets the same lease.
if ! lease=$(hangar lease "$HANGAR_POOL" --wait "$HANGAR_WAIT" --ttl "$HANGAR_TTL" \
	--client-token "gitlab-job-$CUSTOM_ENV_CI_JOB_ID" -o json); then
	exit "$SYSTEM_FAILURE_EXIT_CODE"
fi
id=$(jq -r .id <<<"$lease")
if [ "$(jq -r .state <<<"$lease")" != active ]; then
	echo "no instance of pool $HANGAR_POOL within $HANGAR_WAIT" >&2
	hangar release "$id" >/dev/null || true
	exit "$SYSTEM_FAILURE_EXIT_CODE"
fi
echo "$id" >"$state"
echo "Running on $(jq -r .instance.id <<<"$lease") (Hangar lease $id)"
