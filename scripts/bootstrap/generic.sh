#!/bin/bash
# Hangar's default bootstrap script. The user-data fetches and runs it with
# HANGAR_URL, HANGAR_POOL, HANGAR_BOOTSTRAP_TOKEN and the pool env exported.
# It reports the instance ready, then long-polls Hangar for assignments and
# runs at most one CI worker at a time. Needs bash and curl only.
#
# Protocol (every call carries "Authorization: Bearer $HANGAR_BOOTSTRAP_TOKEN"):
#   POST /bootstrap/v1/ready       form: hostname, ssh_host_key (if readable)
#   POST /bootstrap/v1/heartbeat   form: lease, worker=running|exited|none,
#                                  exit_code (only with worker=exited)
#   GET  /bootstrap/v1/assignment?wait=50s&current=<lease id or empty>
#        200: lines NAME='value' or export NAME='value' (quoted like
#        userdata.ShellQuote) setting HANGAR_ASSIGNMENT to none, assigned,
#        released or terminate.
#   401, 403 or 404 anywhere but heartbeat: Hangar no longer knows this
#   instance, so the script stops its worker and exits 1.
#
# The worker command must stay in the foreground (buildbot-worker start
# --nodaemon): a worker that calls setsid itself escapes being stopped.
#
# HANGAR_SSH_HOST_KEY_FILE overrides the host key's path, for tests.

set -u
exec 2>&1

log() { printf 'hangar-bootstrap: %s\n' "$*"; }

for var in HANGAR_URL HANGAR_POOL HANGAR_BOOTSTRAP_TOKEN; do
	if [ -z "${!var:-}" ]; then
		log "$var is not set; this script must be run by Hangar's user-data"
		exit 1
	fi
done

# call OUTPUT CURL-ARGS... prints the HTTP status (000 when there was none).
# The token goes to curl on stdin, not in its arguments, where ps would show
# it to the builds running on this instance.
call() {
	local out=$1
	shift
	printf 'Authorization: Bearer %s\n' "$HANGAR_BOOTSTRAP_TOKEN" |
		curl -sS --connect-timeout 10 -H @- -o "$out" -w '%{http_code}' "$@"
}

# field FILE NAME prints variable NAME as set by the assignment in FILE. It
# sources the file in a subshell so that neither the password nor the
# lease's env ever enter this shell.
field() {
	(
		# shellcheck disable=SC1090
		. "$1" && printf '%s' "${!2-}"
	)
}

delay=1
backoff() {
	log "$1; retrying in ${delay}s"
	sleep "$delay"
	delay=$((delay < 15 ? delay * 2 : 30))
}

gone() {
	log "Hangar answered HTTP $1 to $2: it no longer knows this instance; stopping"
	stop_worker
	exit 1
}

current=""      # the lease this instance holds; empty when idle and clean
worker_pid=""   # also the worker's process group, thanks to setsid
worker_state=none
exit_code=""

start_worker() {
	local file=$1 lease command
	lease=$(field "$file" HANGAR_LEASE_ID)
	command=$(field "$file" HANGAR_WORKER_COMMAND)
	if [ -n "$worker_pid" ]; then
		log "lease $lease replaces lease $current"
		stop_worker
	fi
	current=$lease
	if [ -z "$command" ]; then
		rm -f "$file"
		log "lease $lease has no worker command; holding the lease without a worker"
		return
	fi
	(
		# shellcheck disable=SC1090
		. "$file"
		rm -f "$file"
		export HANGAR_LEASE_ID HANGAR_WORKER_NAME HANGAR_WORKER_PASSWORD HANGAR_WORKER_MASTER
		unset HANGAR_BOOTSTRAP_TOKEN
		exec setsid bash -c "$HANGAR_WORKER_COMMAND" </dev/null
	) &
	worker_pid=$!
	worker_state=running
	exit_code=""
	log "worker started for lease $lease"
}

# check_worker notices a worker that exited by itself.
check_worker() {
	if [ "$worker_state" = running ] && ! kill -0 "$worker_pid" 2>/dev/null; then
		wait "$worker_pid"
		exit_code=$?
		worker_state=exited
		log "worker for lease $current exited with status $exit_code"
	fi
}

# stop_worker ends the worker's whole process group, even when its leader
# has already exited and left children behind.
stop_worker() {
	[ -n "$worker_pid" ] || return 0
	if ! kill -TERM -- "-$worker_pid" 2>/dev/null && [ "$worker_state" = running ]; then
		# Too early: the worker has not called setsid yet.
		kill -TERM "$worker_pid" 2>/dev/null
	fi
	# Up to 10s: most workers are gone within milliseconds, and a released
	# instance is not leased again until this returns.
	local i
	for ((i = 0; i < 110; i++)); do
		kill -0 -- "-$worker_pid" 2>/dev/null || break
		if ((i < 20)); then sleep 0.005; else sleep 0.1; fi
	done
	kill -KILL -- "-$worker_pid" 2>/dev/null
	if [ "$worker_state" = running ]; then
		wait "$worker_pid" 2>/dev/null
	fi
	log "worker for lease $current stopped"
	worker_pid=""
	worker_state=none
	exit_code=""
}

cleanup() {
	local command=$1
	[ -n "$command" ] || return 0
	log "running the cleanup command"
	(
		unset HANGAR_BOOTSTRAP_TOKEN
		bash -c "$command" </dev/null
	)
	log "cleanup command exited with status $?"
}

heartbeat() {
	local args=(--data-urlencode "lease=$current" --data-urlencode "worker=$worker_state") code
	if [ "$worker_state" = exited ]; then
		args+=(--data-urlencode "exit_code=$exit_code")
	fi
	code=$(call /dev/null --max-time 10 "${args[@]}" "$HANGAR_URL/bootstrap/v1/heartbeat")
	case $code in
	2??) ;;
	*) log "heartbeat failed (HTTP $code)" ;;
	esac
}

answer=""
trap 'log "terminated by a signal"; [ -z "$answer" ] || rm -f "$answer"; stop_worker; exit 143' TERM INT

ready() {
	local key=${HANGAR_SSH_HOST_KEY_FILE:-/etc/ssh/ssh_host_ed25519_key.pub} code
	local args=(--data-urlencode "hostname=$HOSTNAME")
	if [ -r "$key" ]; then
		args+=(--data-urlencode "ssh_host_key@$key")
	fi
	while :; do
		code=$(call /dev/null --max-time 30 "${args[@]}" "$HANGAR_URL/bootstrap/v1/ready")
		case $code in
		2??) log "reported ready to $HANGAR_URL as pool $HANGAR_POOL"; delay=1; return ;;
		401 | 403 | 404) gone "$code" ready ;;
		*) backoff "reporting ready failed (HTTP $code)" ;;
		esac
	done
}

ready
while :; do
	check_worker
	heartbeat
	answer=$(mktemp "${TMPDIR:-/tmp}/hangar-assignment.XXXXXXXXXX") || { backoff "cannot create a temporary file"; continue; }
	asked=$SECONDS
	code=$(call "$answer" --max-time 70 -G --data-urlencode wait=50s --data-urlencode "current=$current" "$HANGAR_URL/bootstrap/v1/assignment")
	case $code in
	200) ;;
	401 | 403 | 404) rm -f "$answer"; gone "$code" assignment ;;
	*) rm -f "$answer"; backoff "polling for an assignment failed (HTTP $code)"; continue ;;
	esac
	delay=1
	assignment=$(field "$answer" HANGAR_ASSIGNMENT)
	case $assignment in
	none)
		rm -f "$answer"
		# A server that answers at once must not turn the long poll into a
		# busy loop.
		if [ "$SECONDS" = "$asked" ]; then sleep 1; fi
		;;
	assigned)
		start_worker "$answer"
		;;
	released)
		command=$(field "$answer" HANGAR_CLEANUP_COMMAND)
		rm -f "$answer"
		stop_worker
		log "lease $current released"
		cleanup "$command"
		current=""
		;;
	terminate)
		rm -f "$answer"
		log "Hangar asked this instance to terminate"
		stop_worker
		exit 0
		;;
	*)
		rm -f "$answer"
		backoff "unexpected assignment answer (HANGAR_ASSIGNMENT=$assignment)"
		;;
	esac
done
