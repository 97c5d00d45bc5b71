#!/bin/bash
# Hangar's Jenkins bootstrap: generic.sh's protocol, which Hangar includes
# below where this script is served, with a Jenkins inbound agent as the
# worker command. Pools that use it and set no worker_command run this one:
# hangar:worker-command exec bash "$HANGAR_JENKINS_AGENT"
# A pool with a [pools.NAME.jenkins] table uses it unless it names another
# bootstrap or a worker_command.
#
# At boot it makes sure there is a java (apt-get installs
# default-jre-headless when it is missing; never on the local cloud, whose
# "instances" are the host itself) and writes the agent script named by
# HANGAR_JENKINS_AGENT. Then generic.sh reports ready and waits for
# assignments. For each one, which `hangar jenkins` makes for a node it
# created, the agent script downloads agent.jar from the controller named by
# HANGAR_WORKER_MASTER (its root URL) and runs it as a WebSocket inbound
# agent with the node's name (HANGAR_WORKER_NAME) and secret
# (HANGAR_WORKER_PASSWORD), in the foreground, so that generic.sh stops it
# on release.
#
# The secret goes to agent.jar in a private file (-secret @FILE), never on
# its command line, where ps would show it to every build on the instance,
# nor in the agent's environment, which builds inherit.
#
# Pool env it reads, all optional:
#   JENKINS_AGENT_WORKDIR    the agent's -workDir (default /var/lib/jenkins-agent;
#                            a relative path is under $HOME)
#   JENKINS_AGENT_JAVA       the java command (default: java on PATH)
#   JENKINS_AGENT_JAVA_OPTS  JVM options, split on blanks
# On the local cloud HANGAR_ROOT is what "/" is to an instance.
#
# This part runs twice at boot: generic.sh saves the bootstrap token and runs
# the whole script again without it in its environment, so it must be
# idempotent (the second run finds what the first installed and wrote).

# The HANGAR_* variables come from the user-data, not from this script.
# shellcheck disable=SC2153
set -u
exec 2>&1

jenkins_log() { printf 'hangar-jenkins-agent: %s\n' "$*"; }

# jenkins_agent runs the agent of the current assignment; it is written
# out as the agent script, which the worker command runs.
jenkins_agent() {
	local var master name workdir java jar fresh status
	local -a get opts
	for var in HANGAR_WORKER_NAME HANGAR_WORKER_PASSWORD HANGAR_WORKER_MASTER; do
		if [ -z "${!var:-}" ]; then
			jenkins_log "$var is not set; the agent runs for a lease that \`hangar jenkins\` took for a node"
			return 2
		fi
	done
	case $HANGAR_WORKER_MASTER in
	http://* | https://*) ;;
	*)
		jenkins_log "HANGAR_WORKER_MASTER is not a Jenkins root URL: $HANGAR_WORKER_MASTER"
		return 2
		;;
	esac
	master=${HANGAR_WORKER_MASTER%/}/
	name=$HANGAR_WORKER_NAME
	workdir=$(jenkins_workdir)
	java=${JENKINS_AGENT_JAVA:-java}
	if ! command -v "$java" >/dev/null; then
		jenkins_log "$java is not installed; the agent needs a Java runtime (Debian: default-jre-headless)"
		return 1
	fi
	# Private, as is the secret below; the agent itself, and so its builds,
	# keeps the umask it was given.
	if ! (umask 077 && mkdir -p "$workdir"); then
		jenkins_log "cannot create the work directory $workdir"
		return 1
	fi

	# agent.jar comes from the controller so that its version matches; one
	# kept from an earlier lease is only fetched again when the controller
	# has a newer one.
	jar=$workdir/agent.jar
	fresh=$(mktemp "$workdir/agent.jar.XXXXXXXXXX") || return 1
	get=(curl -fsSR --retry 5 --retry-connrefused --connect-timeout 10 --max-time 300 -o "$fresh")
	if [ -s "$jar" ]; then
		get+=(-z "$jar")
	fi
	if "${get[@]}" "${master}jnlpJars/agent.jar"; then
		if [ -s "$fresh" ]; then
			mv -f "$fresh" "$jar"
			jenkins_log "downloaded agent.jar from $master"
		else
			rm -f "$fresh"
		fi
	else
		rm -f "$fresh"
		if [ ! -s "$jar" ]; then
			jenkins_log "downloading ${master}jnlpJars/agent.jar failed"
			return 1
		fi
		jenkins_log "downloading agent.jar failed; using the one from an earlier lease"
	fi

	# Global: the EXIT trap runs after the function has returned.
	jenkins_secret=$workdir/.agent-secret
	rm -f "$jenkins_secret"
	(umask 077 && printf '%s\n' "$HANGAR_WORKER_PASSWORD" >"$jenkins_secret") || return 1
	unset HANGAR_WORKER_PASSWORD
	# generic.sh stops the agent by signalling the whole process group: java
	# gets the signal too, and this shell removes the secret once it is gone.
	trap 'rm -f "$jenkins_secret"' EXIT
	trap 'exit 143' TERM INT

	read -r -a opts <<<"${JENKINS_AGENT_JAVA_OPTS:-}"
	jenkins_log "connecting node $name to $master"
	"$java" "${opts[@]}" -jar "$jar" -url "$master" -name "$name" -secret "@$jenkins_secret" -webSocket -workDir "$workdir" </dev/null
	status=$?
	jenkins_log "agent of node $name exited with status $status"
	return "$status"
}

# jenkins_workdir prints the agent's work directory.
jenkins_workdir() {
	local dir=${JENKINS_AGENT_WORKDIR:-/var/lib/jenkins-agent}
	case $dir in
	/*) printf '%s\n' "${HANGAR_ROOT:-}$dir" ;;
	*) printf '%s\n' "$HOME/$dir" ;;
	esac
}

jenkins_java=${JENKINS_AGENT_JAVA:-java}
if ! command -v "$jenkins_java" >/dev/null; then
	if [ -n "${HANGAR_ROOT:-}" ]; then
		jenkins_log "$jenkins_java is missing; on the local cloud install it on this machine yourself (apt-get install default-jre-headless)"
		exit 1
	fi
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		jenkins_log "installing default-jre-headless"
		# The package manager may be busy at boot (cloud-init, unattended
		# upgrades): apt-get waits for its lock.
		DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update &&
			DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
				install --no-install-recommends default-jre-headless
	fi
	if ! command -v "$jenkins_java" >/dev/null; then
		# Never ready: the pool replaces the instance after boot_timeout.
		jenkins_log "giving up: no $jenkins_java, and it could not be installed"
		exit 1
	fi
fi
jenkins_log "using $(command -v "$jenkins_java")"

jenkins_dir=$(jenkins_workdir)
if ! (umask 077 && mkdir -p "$jenkins_dir"); then
	jenkins_log "cannot create the work directory $jenkins_dir"
	exit 1
fi
export HANGAR_JENKINS_AGENT="$jenkins_dir/.hangar-agent.sh"
{
	printf '#!/bin/bash\n# Written by jenkins-agent.sh at boot: runs the inbound agent of the current assignment.\nset -u\n'
	declare -f jenkins_log jenkins_workdir jenkins_agent
	printf 'jenkins_agent\n'
} >"$HANGAR_JENKINS_AGENT.tmp" && chmod 0755 "$HANGAR_JENKINS_AGENT.tmp" && mv -f "$HANGAR_JENKINS_AGENT.tmp" "$HANGAR_JENKINS_AGENT" || exit 1

# hangar:include generic.sh
