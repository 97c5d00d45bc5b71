#!/bin/bash
# Hangar's default bootstrap script. The user-data fetches and runs it with
# HANGAR_URL, HANGAR_POOL, HANGAR_BOOTSTRAP_TOKEN and the pool env exported.
# It reports the instance ready, then long-polls Hangar for assignments and
# runs at most one CI worker at a time, and the commands of `hangar run`.
# Needs bash, curl and coreutils (sha256sum, env, mktemp, mv); worker_user
# needs getent, useradd (when the user is missing) and util-linux's setpriv.
#
# Protocol (every call carries "Authorization: Bearer TOKEN", the current
# bootstrap token; see "The token" below):
#   POST /bootstrap/v1/ready       form: hostname, ssh_host_key (if readable)
#   GET  /bootstrap/v1/assignment?wait=50s&current=<lease id or empty>&run=N&rotate=1
#        &worker=running|exited|none[&exit_code=N][&run_exit_code=N]
#        rotate=1 says that this script takes rotated tokens (below).
#        worker= makes the poll the instance's heartbeat too: exit_code is
#        the worker's (only with worker=exited), run_exit_code that of run
#        N, once it has exited (said again in case its own report was
#        lost). (POST /bootstrap/v1/heartbeat takes the same as a form,
#        with lease= for current=, for bootstraps that send it apart.)
#        200: lines NAME='value' or export NAME='value' (quoted like
#        internal/shell.Quote) setting HANGAR_ASSIGNMENT to none, assigned,
#        released, save-cache or sync-cache (see "Build cache" below) or
#        terminate. cache=saved or cache=synced says the cache is flushed,
#        as they asked. run= is the last run of the current lease
#        started here (0 for none); "assigned" with HANGAR_RUN_ID and
#        HANGAR_RUN_COMMAND (one shell command line) asks for a run, on the
#        current lease too. HANGAR_NEW_TOKEN, in any answer (Hangar sends
#        it on "released"), replaces the token: it is saved before
#        anything else is done, and every later call carries it.
#        HANGAR_WORKER_USER (assigned, released): the user that the worker,
#        the run and the cleanup command run as.
#   PUT  /bootstrap/v1/output?lease=ID&run=N   the run's output, streamed
#   POST /bootstrap/v1/exit        form: lease, run, exit_code (after the
#                                  output upload has finished)
#   401, 403 or 404 to ready or assignment: Hangar no longer knows this
#   instance, so the script stops its worker and exits 1.
#   POST /bootstrap/v1/enroll      (HANGAR_ENROLL=1, before anything else; see
#                                  "Enrollment" below) form: instance_id,
#                                  enroll_key, and with HANGAR_IDENTITY=signed
#                                  document and signature; 200:
#                                  HANGAR_BOOTSTRAP_TOKEN='...', this
#                                  instance's own token
#
# The worker command must stay in the foreground (buildbot-worker start
# --nodaemon): a worker that calls setsid itself escapes being stopped.
# A run's command gets stdin from /dev/null; what it leaves running when it
# exits is ended.
#
# A run's command line is executed as `exec -- COMMAND`: a first word that
# starts with "-" is a command name, never an option of exec.
#
# The token: builds run strangers' code here, so the token is kept out of
# every environment they could read. At start the script saves it in
# STATE/bootstrap-token (STATE is ${HANGAR_ROOT-}/var/lib/hangar; dir 0700,
# file 0600, replaced atomically) and runs itself again without it in its
# environment, so that not even /proc/PID/environ of this script shows it;
# every call reads it from the file. The file holds one line, "ORIGIN
# TOKEN": TOKEN the current token, ORIGIN the SHA-256 (hex) of the token the
# user-data carries, which it descends from. After a stop and start the
# user-data runs again with that original token, which Hangar refuses once
# it has rotated it; it uses the saved token instead when ORIGIN matches its
# own (so a file baked into an image from another instance is ignored).
# A bootstrap script with its own part before generic.sh (buildbot-worker.sh)
# runs that part again when it runs itself again.
#
# Worker user: with HANGAR_WORKER_USER set the worker, each run's command and
# the cleanup command run as that user (created with useradd --system
# --create-home when missing), with its groups, HOME, USER and LOGNAME, in
# its home directory, so that a build cannot read the token file nor this
# script's memory at all. That needs this script to run as root; when it
# does not, it refuses: the worker is reported exited with status 126, and
# a run exits 126 with the reason in its output. Without it, everything
# runs as this script's user, as root usually, which can read the token.
#
# Build cache (a pool with [cache]): HANGAR_CACHE_MOUNT is where to mount the
# volume Hangar attaches at HANGAR_CACHE_DEVICE (/dev/sdf, which Xen shows
# as /dev/xvdf). Before reporting ready the script waits for it, formats it
# when blank (ext4) and mounts it; on the local cloud ($HANGAR_ROOT set) the
# volume is a directory linked at $HANGAR_ROOT/dev/sdf, and
# $HANGAR_ROOT$HANGAR_CACHE_MOUNT becomes a link to it. The worker and the
# runs get its path in HANGAR_CACHE_DIR. When Hangar ends an instance that
# served a lease it answers save-cache: the script stops the worker, flushes
# the cache (sync, then fsfreeze where the cache is a mounted filesystem)
# and polls with cache=saved; Hangar snapshots the volume, then ends the
# instance. To snapshot an idle instance's cache (a refresh) it answers
# sync-cache: the script flushes it and polls with cache=synced.
#
# Enrollment: the user-data of a batched launch is shared by all its
# instances, so its token (HANGAR_BOOTSTRAP_TOKEN) is the batch's enrollment
# token, and HANGAR_ENROLL=1 says so. Unless the token file already holds a
# token that descends from it (an earlier boot enrolled), the script reads
# the instance id from the metadata service (HANGAR_METADATA_URL, default
# http://169.254.169.254, IMDSv2 where it can), and with HANGAR_IDENTITY=signed
# also the instance identity document and its /signature, and enrolls with
# them and STATE/enroll-key (64 random hex digits, 0600, kept so that a retry
# whose answer was lost is recognised). Hangar answers with the instance's own
# token, which is saved with the batch token's hash as its ORIGIN, and from
# then on everything goes as above. An answer 503 (the launch has not
# answered yet), another 5xx or none is asked again, for up to ten minutes
# (HANGAR_ENROLL_TIMEOUT seconds); a 401 (Hangar does not take this instance
# id for this batch, or the batch token is dead) ends the script with status 1.
#
# HANGAR_SSH_HOST_KEY_FILE overrides the host key's path, and
# HANGAR_STATE_DIR the STATE directory, for tests.

set -u
exec 2>&1

log() { printf 'hangar-bootstrap: %s\n' "$*"; }

for var in HANGAR_URL HANGAR_POOL; do
	if [ -z "${!var:-}" ]; then
		log "$var is not set; this script must be run by Hangar's user-data"
		exit 1
	fi
done

state_dir=${HANGAR_STATE_DIR:-${HANGAR_ROOT-}/var/lib/hangar}
token_file=$state_dir/bootstrap-token

# save_token ORIGIN TOKEN replaces the token file atomically. printf is a
# builtin: the token is in no command line.
save_token() {
	local tmp
	case $2 in
	'' | *[!A-Za-z0-9_-]*)
		log "refusing to save a bootstrap token with characters other than A-Z, a-z, 0-9, '_' and '-'"
		return 1
		;;
	esac
	tmp=$(umask 077 && mktemp "$state_dir/.bootstrap-token.XXXXXXXXXX") || return 1
	if ! printf '%s %s\n' "$1" "$2" >"$tmp" || ! mv -f "$tmp" "$token_file"; then
		rm -f "$tmp"
		return 1
	fi
}

# read_answer FILE NAME... sets answer_NAME, for each NAME, as the answer in
# FILE sets NAME. It sources the file in one subshell for all of them, so
# that neither the password nor the lease's env ever enter this shell, and
# so that an answer costs one fork, not one a field.
read_answer() {
	local file=$1 name i=0 values=()
	shift
	mapfile -d '' -t values < <(
		# shellcheck disable=SC1090
		. "$file" && for name in "$@"; do printf '%s\0' "${!name-}"; done
	)
	for name in "$@"; do
		printf -v "answer_$name" '%s' "${values[i]-}"
		i=$((i + 1))
	done
}

# enroll_key prints this instance's enroll key, made (0600) at its first
# enrollment and kept, with no line break (curl sends the file as it is).
enroll_key() {
	local file=$state_dir/enroll-key key="" tmp
	[ ! -f "$file" ] || key=$(<"$file")
	if ! [[ $key =~ ^[0-9a-f]{64}$ ]]; then
		key=$(head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n') &&
			[[ $key =~ ^[0-9a-f]{64}$ ]] &&
			tmp=$(umask 077 && mktemp "$state_dir/.enroll-key.XXXXXXXXXX") || return 1
		if ! printf '%s' "$key" >"$tmp" || ! mv -f "$tmp" "$file"; then
			rm -f "$tmp"
			return 1
		fi
	fi
	printf '%s' "$file"
}

imds=${HANGAR_METADATA_URL:-http://169.254.169.254}
imds_token=""

# imds_get PATH prints the metadata at latest/PATH, with an IMDSv2 token
# when the service issues one (IMDSv1 otherwise).
imds_get() {
	if [ -z "$imds_token" ]; then
		imds_token=$(curl -fsS --connect-timeout 2 --max-time 5 -X PUT \
			-H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$imds/latest/api/token" 2>/dev/null) || imds_token=""
	fi
	if [ -n "$imds_token" ]; then
		printf 'X-aws-ec2-metadata-token: %s\n' "$imds_token" |
			curl -fsS --connect-timeout 2 --max-time 10 -H @- "$imds/latest/$1"
	else
		curl -fsS --connect-timeout 2 --max-time 10 "$imds/latest/$1"
	fi
}

# enroll trades the batch token in HANGAR_BOOTSTRAP_TOKEN for this
# instance's own, which it sets answer_HANGAR_BOOTSTRAP_TOKEN to (see
# "Enrollment" above). It exits the script when Hangar refuses or time is up.
enroll() {
	local id="" key_file answer code wait=1 identity=() what
	local deadline=$((SECONDS + ${HANGAR_ENROLL_TIMEOUT:-600}))
	if ! key_file=$(enroll_key); then
		log "cannot create the enroll key in $state_dir"
		exit 1
	fi
	if ! answer=$(umask 077 && mktemp "$state_dir/.enroll-answer.XXXXXXXXXX"); then
		log "cannot create a temporary file in $state_dir"
		exit 1
	fi
	while :; do
		code=""
		if [ -z "$id" ] && ! { id=$(imds_get meta-data/instance-id) && [[ $id =~ ^i-[0-9a-f]{8,17}$ ]]; }; then
			id=""
			what="reading the instance id from the metadata service at $imds failed"
		elif [ "${HANGAR_IDENTITY-}" = signed ] && [ ${#identity[@]} = 0 ] && ! {
			imds_get dynamic/instance-identity/document >"$state_dir/identity-document" &&
				imds_get dynamic/instance-identity/signature >"$state_dir/identity-signature"
		}; then
			what="reading the signed instance identity from the metadata service at $imds failed"
		else
			if [ "${HANGAR_IDENTITY-}" = signed ]; then
				identity=(--data-urlencode "document@$state_dir/identity-document" --data-urlencode "signature@$state_dir/identity-signature")
			fi
			code=$(printf 'Authorization: Bearer %s\n' "$HANGAR_BOOTSTRAP_TOKEN" |
				curl -sS --connect-timeout 10 --max-time 30 -H @- -o "$answer" -w '%{http_code}' \
					--data-urlencode "instance_id=$id" --data-urlencode "enroll_key@$key_file" "${identity[@]}" \
					"$HANGAR_URL/bootstrap/v1/enroll")
			case $code in
			200)
				read_answer "$answer" HANGAR_BOOTSTRAP_TOKEN
				rm -f "$answer"
				log "enrolled instance $id with Hangar"
				return 0
				;;
			401)
				rm -f "$answer"
				log "enrollment refused for instance $id"
				exit 1
				;;
			503) what="Hangar cannot enroll instance $id yet (HTTP 503)" wait=2 ;;
			5?? | 000) what="enrolling instance $id failed (HTTP $code)" ;;
			*)
				rm -f "$answer"
				log "Hangar answered HTTP $code to the enrollment of instance $id; giving up"
				exit 1
				;;
			esac
		fi
		if ((SECONDS + wait > deadline)); then
			rm -f "$answer"
			log "giving up: $what, for ${SECONDS}s"
			exit 1
		fi
		log "$what; retrying in ${wait}s"
		sleep "$wait"
		# Hangar asks again in 2s when the launch has not answered; any
		# other failure backs off.
		if [ "$code" = 503 ]; then wait=2; else wait=$((wait < 15 ? wait * 2 : 30)); fi
	done
}

if [ -n "${HANGAR_BOOTSTRAP_TOKEN:-}" ]; then
	# -m for the last directory only: the others are /var and /var/lib.
	# shellcheck disable=SC2174
	if ! mkdir -p -m 0700 "$state_dir" || ! chmod 0700 "$state_dir"; then
		log "cannot create $state_dir, where the bootstrap token is kept"
		exit 1
	fi
	# A batch token is traded for this instance's own, once: a token saved
	# by an earlier boot that descends from it is this instance's already.
	if [ "${HANGAR_ENROLL-}" = 1 ]; then
		if ! batch=$(printf '%s' "$HANGAR_BOOTSTRAP_TOKEN" | sha256sum); then
			log "cannot hash the batch token"
			exit 1
		fi
		batch=${batch%% *}
		if { read -r origin saved <"$token_file" && [ -n "$saved" ] &&
			{ [ "$saved" = "$HANGAR_BOOTSTRAP_TOKEN" ] || [ "$origin" = "$batch" ]; }; } 2>/dev/null; then
			HANGAR_BOOTSTRAP_TOKEN=$saved
		else
			answer_HANGAR_BOOTSTRAP_TOKEN=""
			enroll
			if ! save_token "$batch" "$answer_HANGAR_BOOTSTRAP_TOKEN"; then
				log "cannot save the bootstrap token Hangar issued in $token_file"
				exit 1
			fi
			HANGAR_BOOTSTRAP_TOKEN=$answer_HANGAR_BOOTSTRAP_TOKEN
		fi
		unset batch origin saved answer_HANGAR_BOOTSTRAP_TOKEN
	fi
	# The user-data passes the saved token itself when it descends from
	# its own; any other is an original, which starts a new line.
	if ! { read -r _ saved <"$token_file" && [ "$saved" = "$HANGAR_BOOTSTRAP_TOKEN" ]; } 2>/dev/null; then
		if ! origin=$(printf '%s' "$HANGAR_BOOTSTRAP_TOKEN" | sha256sum) ||
			! save_token "${origin%% *}" "$HANGAR_BOOTSTRAP_TOKEN"; then
			log "cannot save the bootstrap token in $token_file"
			exit 1
		fi
	fi
	unset saved
	if [ ! -f "$0" ]; then
		log "cannot run $0 again without the bootstrap token in its environment: run this script from a file"
		exit 1
	fi
	# Without the token, the next run cannot come here again. $$ stays the
	# same across exec: the marker only holds for this very process.
	exec env -u HANGAR_BOOTSTRAP_TOKEN HANGAR_BOOTSTRAP_REEXEC=$$ "$BASH" "$0" "$@"
elif [ "${HANGAR_BOOTSTRAP_REEXEC:-}" = "$$" ]; then
	unset HANGAR_BOOTSTRAP_REEXEC
else
	log "HANGAR_BOOTSTRAP_TOKEN is not set; this script must be run by Hangar's user-data"
	exit 1
fi

# auth_header prints the Authorization header with the current token, read
# from the token file at each call: Hangar may have rotated it.
auth_header() {
	local origin token
	if ! read -r origin token <"$token_file" || [ -z "$token" ]; then
		log "cannot read the bootstrap token from $token_file" >&2
		return 1
	fi
	printf 'Authorization: Bearer %s\n' "$token"
}

# call OUTPUT CURL-ARGS... prints the HTTP status (000 when there was none).
# The token goes to curl on stdin, not in its arguments, where ps would show
# it to the builds running on this instance.
call() {
	local out=$1
	shift
	auth_header | curl -sS --connect-timeout 10 -H @- -o "$out" -w '%{http_code}' "$@"
}

# rotate saves the token the answer read brings, if any, in place of the
# current one; the current one is dead already.
rotate() {
	local new=$answer_HANGAR_NEW_TOKEN origin token
	[ -n "$new" ] || return 0
	if ! read -r origin token <"$token_file" || ! save_token "$origin" "$new"; then
		return 1
	fi
	log "Hangar rotated the bootstrap token; saved the new one"
}

# ensure_user USER makes sure commands can run as USER, creating it when it
# is missing; only root can. Says why not, and fails, otherwise.
ensure_user() {
	local user=$1
	if ((EUID != 0)); then
		log "worker_user is $user, but this bootstrap runs as uid $EUID, not root, and cannot run commands as another user; refusing to run them"
		return 1
	fi
	if ! [[ $user =~ ^[a-z_][a-z0-9_-]{0,31}$ ]]; then
		log "worker_user $user is not a user name this script accepts; refusing to run commands"
		return 1
	fi
	getent passwd "$user" >/dev/null && return 0
	log "creating the user $user"
	if ! useradd --system --create-home --shell /bin/bash "$user" || ! getent passwd "$user" >/dev/null; then
		log "cannot create the user $user; refusing to run commands"
		return 1
	fi
}

# become USER COMMAND... execs COMMAND as USER (see ensure_user), with its
# uid, group and groups, HOME, USER and LOGNAME, in its home directory (or
# /); with USER empty, as this script's user, as it is.
become() {
	local user=$1 name uid gid home
	shift
	if [ -z "$user" ]; then
		exec "$@"
	fi
	IFS=: read -r name _ uid gid _ home _ < <(getent passwd "$user")
	if [ "$name" != "$user" ] || [ -z "$uid" ] || [ -z "$gid" ]; then
		log "cannot look up the user $user"
		exit 126
	fi
	export HOME=$home USER=$user LOGNAME=$user
	cd -- "$home" 2>/dev/null || cd /
	exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
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
report=()       # the heartbeat the next poll carries, as report sets it
# The last answer's fields, as read_answer sets them.
answer_HANGAR_NEW_TOKEN="" answer_HANGAR_ASSIGNMENT="" answer_HANGAR_LEASE_ID="" answer_HANGAR_RUN_ID=""
answer_HANGAR_WORKER_COMMAND="" answer_HANGAR_CLEANUP_COMMAND="" answer_HANGAR_WORKER_USER=""

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
	local file=$1 lease=$answer_HANGAR_LEASE_ID command=$answer_HANGAR_WORKER_COMMAND
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
		user=${HANGAR_WORKER_USER-}
		unset HANGAR_WORKER_USER HANGAR_NEW_TOKEN
		if [ -n "$user" ] && ! ensure_user "$user"; then
			exit 126
		fi
		become "$user" setsid bash -c "$HANGAR_WORKER_COMMAND" </dev/null
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

# cleanup COMMAND USER runs the cleanup command, as USER when not empty.
cleanup() {
	local command=$1 user=$2
	[ -n "$command" ] || return 0
	log "running the cleanup command"
	(
		if [ -n "$user" ] && ! ensure_user "$user"; then
			exit 126
		fi
		become "$user" bash -c "$command" </dev/null
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
			-T - "$HANGAR_URL/bootstrap/v1/output?lease=$lease&run=$run" 4<<<"$(auth_header)")
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

# report_exit LEASE RUN STATUS; the next poll repeats what this could not say.
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
		# What goes wrong before the command starts is in its output too.
		exec 3>&- >"$dir/output" 2>&1
		# shellcheck disable=SC1090
		. "$file"
		rm -f "$file"
		export HANGAR_LEASE_ID HANGAR_WORKER_NAME HANGAR_WORKER_PASSWORD HANGAR_WORKER_MASTER HANGAR_RUN_ID
		user=${HANGAR_WORKER_USER-}
		unset HANGAR_WORKER_USER HANGAR_NEW_TOKEN
		if [ -n "$user" ] && ! ensure_user "$user"; then
			exit 126
		fi
		# Read from a file, not bash -c: one argument holds at most 128
		# KiB. exec: the command leads the session, with no shell around
		# it to add words of its own to the output; "--": its first word
		# is a command even when it starts with "-".
		printf 'exec -- %s </dev/null\n' "$HANGAR_RUN_COMMAND" >"$dir/command"
		become "$user" setsid bash -s <"$dir/command"
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
	local file=$1 run=$answer_HANGAR_RUN_ID
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

# report sets report to what a poll tells Hangar as the instance's
# heartbeat: the worker's state and exit status, and the last run's exit
# status once it has exited.
report() {
	report=(--data-urlencode "worker=$worker_state")
	if [ "$worker_state" = exited ]; then
		report+=(--data-urlencode "exit_code=$exit_code")
	fi
	if [ -n "$run_exit" ]; then
		report+=(--data-urlencode "run_exit_code=$run_exit")
	fi
	if [ -n "$cache_state" ]; then
		report+=(--data-urlencode "cache=$cache_state")
	fi
}

# mount_cache mounts the build cache, if the pool has one, and exports
# HANGAR_CACHE_DIR.
mount_cache() {
	[ -n "${HANGAR_CACHE_MOUNT-}" ] || return 0
	local dev=${HANGAR_CACHE_DEVICE:-/dev/sdf} dir=${HANGAR_ROOT-}$HANGAR_CACHE_MOUNT waited=0
	dev=${HANGAR_ROOT-}$dev
	while :; do
		if [ -e "$dev" ]; then
			break
		elif [ -z "${HANGAR_ROOT-}" ] && [ -e "${dev/#\/dev\/sd//dev/xvd}" ]; then
			dev=${dev/#\/dev\/sd//dev/xvd}
			break
		fi
		if ((waited % 30 == 0)); then log "waiting for the cache volume at $dev"; fi
		sleep 1
		waited=$((waited + 1))
	done
	if [ -n "${HANGAR_ROOT-}" ]; then
		[ ! -L "$dir" ] || rm -f "$dir"
		mkdir -p "${dir%/*}" && ln -s "$(readlink -f "$dev")" "$dir" || return 1
	else
		if ! blkid "$dev" >/dev/null 2>&1; then
			log "formatting the blank cache volume $dev"
			mkfs.ext4 -q -L hangar-cache "$dev" || return 1
		fi
		mkdir -p "$dir" && mount "$dev" "$dir" || return 1
	fi
	export HANGAR_CACHE_DIR=$dir
	log "cache volume $dev mounted at $dir"
}

# save_cache does what a save-cache answer asks: the worker stops, the cache
# is flushed (and frozen where it can be), and the next poll says so
# (cache=saved). A sync-cache answer, for a snapshot while the instance
# lives on, only flushes it (cache=synced, until the next lease).
save_cache() {
	stop_worker
	current=""
	current_run=0
	run_exit=""
	sync
	if [ -n "${HANGAR_CACHE_DIR-}" ] && [ -z "${HANGAR_ROOT-}" ] && command -v fsfreeze >/dev/null && mountpoint -q "$HANGAR_CACHE_DIR"; then
		fsfreeze -f "$HANGAR_CACHE_DIR" && log "cache filesystem frozen for its snapshot"
	fi
	cache_state=saved
}
cache_state=""

answer=""
trap 'log "terminated by a signal"; [ -z "$answer" ] || rm -f "$answer"; stop_worker; exit 143' TERM INT

# shellcheck disable=SC2153 # HANGAR_POOL comes from the user-data
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

if ! mount_cache; then
	log "cannot mount the cache volume; not reporting ready"
	exit 1
fi
ready
while :; do
	check_worker
	check_run
	report
	answer=$(mktemp "${TMPDIR:-/tmp}/hangar-assignment.XXXXXXXXXX") || { backoff "cannot create a temporary file"; continue; }
	asked=$SECONDS
	code=$(call "$answer" --max-time 70 -G --data-urlencode wait=50s --data-urlencode "current=$current" --data-urlencode "run=$current_run" "${report[@]}" --data-urlencode rotate=1 "$HANGAR_URL/bootstrap/v1/assignment")
	case $code in
	200) ;;
	401 | 403 | 404) rm -f "$answer"; gone "$code" assignment ;;
	*) rm -f "$answer"; backoff "polling for an assignment failed (HTTP $code)"; continue ;;
	esac
	delay=1
	read_answer "$answer" HANGAR_NEW_TOKEN HANGAR_ASSIGNMENT HANGAR_LEASE_ID HANGAR_RUN_ID \
		HANGAR_WORKER_COMMAND HANGAR_CLEANUP_COMMAND HANGAR_WORKER_USER
	# A new token first: the old one is refused already.
	if ! rotate; then
		rm -f "$answer"
		log "cannot save the bootstrap token Hangar rotated in $token_file; stopping"
		stop_worker
		exit 1
	fi
	assignment=$answer_HANGAR_ASSIGNMENT
	case $assignment in
	none)
		rm -f "$answer"
		# A server that answers at once must not turn the long poll into a
		# busy loop.
		if [ "$SECONDS" = "$asked" ]; then sleep 1; fi
		;;
	assigned)
		lease=$answer_HANGAR_LEASE_ID
		[ "$cache_state" != synced ] || cache_state=""
		if [ -z "$answer_HANGAR_RUN_ID" ]; then
			start_worker "$answer"
		else
			# A lease made for a run, or one more run on the lease held.
			[ "$lease" = "$current" ] || take_lease "$lease"
			start_run "$answer"
		fi
		;;
	released)
		command=$answer_HANGAR_CLEANUP_COMMAND
		user=$answer_HANGAR_WORKER_USER
		rm -f "$answer"
		stop_worker
		log "lease $current released"
		cleanup "$command" "$user"
		current=""
		current_run=0
		run_exit=""
		;;
	save-cache)
		rm -f "$answer"
		if [ "$cache_state" != saved ]; then
			log "Hangar is ending this instance; flushing its cache for a snapshot"
			save_cache
		fi
		;;
	sync-cache)
		rm -f "$answer"
		log "flushing the cache for a snapshot"
		sync
		cache_state=synced
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
