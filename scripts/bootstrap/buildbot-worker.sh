#!/bin/bash
# Hangar's Buildbot bootstrap: generic.sh's protocol, which Hangar includes
# below where this script is served, with a Buildbot worker as the worker
# command. Pools that use it and set no worker_command run this one:
# hangar:worker-command exec bash "$HANGAR_BUILDBOT_START"
#
# At boot it installs buildbot-worker if it is missing (apt-get, else pip in
# a virtualenv; never on the local cloud, whose "instances" are the host
# itself) and writes the start script named by HANGAR_BUILDBOT_START.
# Then generic.sh reports ready and waits for assignments. For each one the
# start script creates or updates the worker directory
# $BUILDBOT_WORKER_HOME/NAME with the assigned name and master and runs
# `buildbot-worker start --nodaemon` in the foreground, so that generic.sh
# stops it on release. The builder directories stay, so an instance that is
# leased again builds warm.
#
# The password is never in a command line or a file: buildbot.tac takes it
# out of the environment, so builds do not inherit it either.
#
# Pool env it reads:
#   BUILDBOT_WORKER_HOME     worker directories (default $HOME/buildbot-worker)
#   BUILDBOT_WORKER_OPTIONS  more `buildbot-worker create-worker` options,
#                            split on spaces, e.g. "--use-tls --keepalive=60"
#   BUILDBOT_WORKER_PIP      what pip installs where apt-get is missing
#                            (default buildbot-worker; e.g. buildbot-worker==4.2.1)
#   BUILDBOT_WORKER_VENV     that virtualenv (default /opt/buildbot-worker)
# On the local cloud HANGAR_ROOT is what "/" is to an instance.
#
# This part runs twice at boot: generic.sh saves the bootstrap token and runs
# the whole script again without it in its environment, so it must be
# idempotent (the second run finds what the first installed and wrote).

# The HANGAR_* variables come from the user-data, not from this script.
# shellcheck disable=SC2153
set -u
exec 2>&1

bb_log() { printf 'hangar-bootstrap: %s\n' "$*"; }

bb_venv=${BUILDBOT_WORKER_VENV:-${HANGAR_ROOT:-}/opt/buildbot-worker}
if [ -x "$bb_venv/bin/buildbot-worker" ]; then
	export PATH="$bb_venv/bin:$PATH"
fi

# bb_install installs buildbot-worker once; the package manager may be busy
# at boot (cloud-init, unattended upgrades), so apt-get waits for its lock.
bb_install() {
	if command -v apt-get >/dev/null; then
		DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update &&
			DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
				install --no-install-recommends buildbot-worker
	elif command -v python3 >/dev/null; then
		python3 -m venv "$bb_venv" &&
			"$bb_venv/bin/pip" install -q "${BUILDBOT_WORKER_PIP:-buildbot-worker}" &&
			export PATH="$bb_venv/bin:$PATH"
	else
		bb_log "neither apt-get nor python3 is here to install buildbot-worker with"
		return 1
	fi
}

if ! command -v buildbot-worker >/dev/null && [ -n "${HANGAR_ROOT:-}" ]; then
	bb_log "buildbot-worker is missing; on the local cloud install it on this machine yourself (apt-get install buildbot-worker)"
	exit 1
fi
if ! command -v buildbot-worker >/dev/null; then
	bb_log "installing buildbot-worker"
	for bb_try in 1 2 3 4 5; do
		bb_install && command -v buildbot-worker >/dev/null && break
		if [ "$bb_try" = 5 ]; then
			# Never ready: the pool replaces the instance after boot_timeout.
			bb_log "giving up: buildbot-worker could not be installed"
			exit 1
		fi
		bb_log "installing buildbot-worker failed; retrying in $((bb_try * 10))s"
		sleep $((bb_try * 10))
	done
fi
bb_log "using $(command -v buildbot-worker) ($(buildbot-worker --version 2>/dev/null | head -n 1))"

bb_home=${BUILDBOT_WORKER_HOME:-$HOME/buildbot-worker}
# Worker names start with a letter or digit: no worker directory is named so.
export HANGAR_BUILDBOT_START="$bb_home/.hangar-start-worker.sh"
mkdir -p "$bb_home" || exit 1
cat >"$HANGAR_BUILDBOT_START.tmp" <<'START'
#!/bin/bash
# Written by Hangar's buildbot-worker.sh: runs the Buildbot worker of the
# current assignment (HANGAR_WORKER_NAME, _MASTER, _PASSWORD) in the
# foreground.
set -eu
dir=${BUILDBOT_WORKER_HOME:-$HOME/buildbot-worker}/$HANGAR_WORKER_NAME
tac=$dir/buildbot.tac
mkdir -p "$dir"
# A name, master or version of the last lease must not linger.
rm -f "$tac" "$tac.new"
# The password given here is a placeholder, replaced just below.
# shellcheck disable=SC2086 # BUILDBOT_WORKER_OPTIONS is a list of options
buildbot-worker create-worker --quiet --force ${BUILDBOT_WORKER_OPTIONS:-} \
	"$dir" "$HANGAR_WORKER_MASTER" "$HANGAR_WORKER_NAME" from-environment
(
	umask 077
	sed "s/^passwd = 'from-environment'\$/passwd = os.environ.pop('HANGAR_WORKER_PASSWORD')/" "$tac" >"$tac.tmp"
)
if ! grep -qx "passwd = os.environ.pop('HANGAR_WORKER_PASSWORD')" "$tac.tmp"; then
	echo "hangar-buildbot: $tac has no passwd line this script knows; not starting" >&2
	exit 1
fi
mv -f "$tac.tmp" "$tac"
echo "hangar-buildbot: worker $HANGAR_WORKER_NAME connecting to $HANGAR_WORKER_MASTER (log: $dir/twistd.log)"
exec buildbot-worker start --nodaemon "$dir"
START
chmod 0755 "$HANGAR_BUILDBOT_START.tmp" && mv -f "$HANGAR_BUILDBOT_START.tmp" "$HANGAR_BUILDBOT_START" || exit 1

# hangar:include generic.sh
