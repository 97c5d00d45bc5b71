#!/bin/bash
# Hangar's default bootstrap script. The user-data fetches and runs it with
# HANGAR_URL, HANGAR_POOL, HANGAR_BOOTSTRAP_TOKEN and the pool env exported.
# It reports the instance ready, then long-polls Hangar for assignments and
# runs at most one CI worker at a time, and the commands of `hangar run`.
# Needs bash and curl only.
#
# Protocol (every call carries "Authorization: Bearer $HANGAR_BOOTSTRAP_TOKEN"):
#   POST /bootstrap/v1/ready       form: hostname, ssh_host_key (if readable)
#   POST /bootstrap/v1/heartbeat   form: lease, worker=running|exited|none,
#                                  exit_code (only with worker=exited),
#                                  run, run_exit_code (a run that exited)
#   GET  /bootstrap/v1/assignment?wait=50s&current=<lease id or empty>&run=N
#        200: lines NAME='value' or export NAME='value' (quoted like
#        userdata.ShellQuote) setting HANGAR_ASSIGNMENT to none, assigned,
#        released or terminate. run= is the last run of the current lease
#        started here (0 for none); "assigned" with HANGAR_RUN_ID and
#        HANGAR_RUN_COMMAND (one shell command line) asks for a run, on the
#        current lease too.
#   PUT  /bootstrap/v1/output?lease=ID&run=N   the run's output, streamed
#   POST /bootstrap/v1/exit        form: lease, run, exit_code (after the
#                                  output upload has finished)
#   401, 403 or 404 to ready or assignment: Hangar no longer knows this
#   instance, so the script stops its worker and exits 1.
#
# The worker command must stay in the foreground (buildbot-worker start
# --nodaemon): a worker that calls setsid itself escapes being stopped.
# A run's command gets stdin from /dev/null; what it leaves running when it
# exits is ended.
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
current_run=0   # the last run of the current lease started here
run_pid=""      # the supervisor of the run under way
run_exit=""     # the status of run current_run, once it has exited
stopping=""     # set in a run's supervisor when it is to stop

# take_lease LEASE makes LEASE the current one, ending what ran for another.
take_lease() {
	if [ -n "$worker_pid$run_pid" ]; then
		log "lease $1 replaces lease $current"
		stop_worker
	fi
	current=$1
	current_run=0
	run_exit=""
}

start_worker() {
	local file=$1 lease command
	lease=$(field "$file" HANGAR_LEASE_ID)
	command=$(field "$file" HANGAR_WORKER_COMMAND)
	take_lease "$lease"
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

# end_group PID [unreaped] ends the process group of session leader PID,
# even when the leader has already exited and left children behind. With
# "unreaped", PID is a child not yet waited for, which may not have called
# setsid yet.
end_group() {
	local pid=$1 i
	if ! kill -TERM -- "-$pid" 2>/dev/null && [ "${2-}" = unreaped ]; then
		kill -TERM "$pid" 2>/dev/null
	fi
	# Up to 10s: most are gone within milliseconds, and a released instance
	# is not leased again until this returns.
	for ((i = 0; i < 110; i++)); do
		kill -0 -- "-$pid" 2>/dev/null || break
		if ((i < 20)); then sleep 0.005; else sleep 0.1; fi
	done
	kill -KILL -- "-$pid" 2>/dev/null
}

# stop_worker ends the run under way and the worker's whole process group.
stop_worker() {
	stop_run
	[ -n "$worker_pid" ] || return 0
	if [ "$worker_state" = running ]; then
		end_group "$worker_pid" unreaped
	else
		end_group "$worker_pid"
	fi
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

# upload LEASE RUN streams stdin, a run's output, to Hangar as it comes, in
# one chunked upload; after a failure, in another (what the broken one had
# read is lost, and Hangar marks the spot). The token reaches curl through
# a descriptor, as stdin is taken. When it gives up it still reads on, so
# that the command's writes never fail.
upload() {
	local lease=$1 run=$2 code tries=0
	while :; do
		code=$(curl -sS --connect-timeout 10 -H @/dev/fd/4 -H 'Expect:' -o /dev/null -w '%{http_code}' \
			-T - "$HANGAR_URL/bootstrap/v1/output?lease=$lease&run=$run" 4<<<"Authorization: Bearer $HANGAR_BOOTSTRAP_TOKEN")
		case $code in
		2??) return 0 ;;
		401 | 403 | 404 | 409)
			log "Hangar refused the output of run $run of lease $lease (HTTP $code); dropping the rest"
			break
			;;
		esac
		# Soon, as the output is live, yet for up to 5 minutes: a server
		# restart. Meanwhile the command writes into the pipe until it is
		# full, and then waits.
		if ((++tries > 64)); then
			log "uploading the output of run $run of lease $lease failed (HTTP $code); giving up"
			break
		fi
		log "uploading the output of run $run of lease $lease failed (HTTP $code); retrying"
		sleep $((tries < 5 ? 1 : 5))
	done
	cat >/dev/null
}

# report_exit LEASE RUN STATUS; the heartbeat repeats what this could not say.
report_exit() {
	local lease=$1 run=$2 status=$3 code tries=0
	while [ -z "$stopping" ]; do
		code=$(call /dev/null --max-time 30 --data-urlencode "lease=$lease" --data-urlencode "run=$run" \
			--data-urlencode "exit_code=$status" "$HANGAR_URL/bootstrap/v1/exit")
		case $code in
		2??) return 0 ;;
		401 | 403 | 404 | 409)
			log "Hangar refused the exit status of run $run of lease $lease (HTTP $code)"
			return 1
			;;
		esac
		if ((++tries >= 8)); then
			log "reporting the exit status of run $run of lease $lease failed (HTTP $code); giving up"
			return 1
		fi
		backoff "reporting the exit status of run $run of lease $lease failed (HTTP $code)"
	done
}

# supervise FILE LEASE RUN runs the command of the assignment in FILE, in a
# background subshell of this script: it needs the token, which the command
# must not get. The command runs in a session of its own, its stdout and
# stderr merged into a FIFO that upload streams to Hangar. When it exits,
# what it left running is ended, the upload finishes, and only then is the
# exit status reported, so Hangar has all the output by then. A TERM (from
# stop_run) ends everything at the next chance. Exits with the command's
# status.
supervise() {
	local file=$1 lease=$2 run=$3 dir cmd_pid up_pid status
	trap 'stopping=1' TERM INT
	if ! dir=$(mktemp -d "${TMPDIR:-/tmp}/hangar-run.XXXXXXXXXX"); then
		rm -f "$file"
		log "run $run of lease $lease: cannot create a temporary directory"
		report_exit "$lease" "$run" 125
		exit 125
	fi
	if ! mkfifo "$dir/output"; then
		rm -rf "$file" "$dir"
		log "run $run of lease $lease: cannot create a FIFO"
		report_exit "$lease" "$run" 125
		exit 125
	fi
	# Read-write, so that neither end's open blocks; closed only once the
	# command and everything it started are gone, which ends the upload.
	exec 3<>"$dir/output"
	upload "$lease" "$run" <"$dir/output" 3>&- &
	up_pid=$!
	(
		trap - TERM INT
		exec 3>&-
		# shellcheck disable=SC1090
		. "$file"
		rm -f "$file"
		export HANGAR_LEASE_ID HANGAR_WORKER_NAME HANGAR_WORKER_PASSWORD HANGAR_WORKER_MASTER HANGAR_RUN_ID
		unset HANGAR_BOOTSTRAP_TOKEN
		# Read from a file, not bash -c: one argument holds at most 128
		# KiB. exec: the command leads the session, with no shell around
		# it to add words of its own to the output.
		printf 'exec %s </dev/null\n' "$HANGAR_RUN_COMMAND" >"$dir/command"
		exec setsid bash -s <"$dir/command" >"$dir/output" 2>&1
	) &
	cmd_pid=$!
	# A TERM just before wait starts is missed; stop_run sends another.
	[ -n "$stopping" ] || wait "$cmd_pid"
	status=$?
	if [ -n "$stopping" ]; then
		end_group "$cmd_pid" unreaped
	else
		end_group "$cmd_pid"
	fi
	exec 3>&-
	[ -n "$stopping" ] || wait "$up_pid"
	if [ -n "$stopping" ]; then
		kill "$up_pid" 2>/dev/null
		rm -rf "$dir"
		exit 143
	fi
	report_exit "$lease" "$run" "$status"
	rm -rf "$dir"
	exit "$status"
}

start_run() {
	local file=$1 run
	run=$(field "$file" HANGAR_RUN_ID)
	stop_run
	current_run=$run
	run_exit=""
	supervise "$file" "$current" "$run" &
	run_pid=$!
	log "run $run of lease $current started"
}

# check_run notices a run that has exited.
check_run() {
	if [ -n "$run_pid" ] && ! kill -0 "$run_pid" 2>/dev/null; then
		wait "$run_pid"
		run_exit=$?
		run_pid=""
		log "run $current_run of lease $current exited with status $run_exit"
	fi
}

# stop_run has the supervisor end the run; again and again, since a TERM
# that arrives just before it starts to wait is not seen until the next.
stop_run() {
	check_run
	[ -n "$run_pid" ] || return 0
	local i
	for ((i = 0; i < 150; i++)); do
		kill -TERM "$run_pid" 2>/dev/null || break
		if ((i < 20)); then sleep 0.005; else sleep 0.1; fi
	done
	kill -KILL "$run_pid" 2>/dev/null
	wait "$run_pid" 2>/dev/null
	run_pid=""
	log "run $current_run of lease $current stopped"
}

heartbeat() {
	local args=(--data-urlencode "lease=$current" --data-urlencode "worker=$worker_state") code
	if [ "$worker_state" = exited ]; then
		args+=(--data-urlencode "exit_code=$exit_code")
	fi
	if [ -n "$run_exit" ]; then
		args+=(--data-urlencode "run=$current_run" --data-urlencode "run_exit_code=$run_exit")
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
	check_run
	heartbeat
	answer=$(mktemp "${TMPDIR:-/tmp}/hangar-assignment.XXXXXXXXXX") || { backoff "cannot create a temporary file"; continue; }
	asked=$SECONDS
	code=$(call "$answer" --max-time 70 -G --data-urlencode wait=50s --data-urlencode "current=$current" --data-urlencode "run=$current_run" "$HANGAR_URL/bootstrap/v1/assignment")
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
		lease=$(field "$answer" HANGAR_LEASE_ID)
		if [ -z "$(field "$answer" HANGAR_RUN_ID)" ]; then
			start_worker "$answer"
		else
			# A lease made for a run, or one more run on the lease held.
			[ "$lease" = "$current" ] || take_lease "$lease"
			start_run "$answer"
		fi
		;;
	released)
		command=$(field "$answer" HANGAR_CLEANUP_COMMAND)
		rm -f "$answer"
		stop_worker
		log "lease $current released"
		cleanup "$command"
		current=""
		current_run=0
		run_exit=""
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
