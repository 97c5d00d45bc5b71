#!/usr/bin/env bash
# The judgment of issue 13 on the shipped traces: with 60 s boots and
# max_instances 200 per pool, min_idle = "auto" must not be dominated by a
# point of the fixed grid (one with both fewer instance-hours and a lower p95
# wait). Too slow for CI under -race (about two minutes here), so it is a
# script: run it after changing pool/autoscale*.go or pool/history.go.
# Prints each trace's auto and the grid's frontier; exits 1 if auto is
# dominated. Needs go and jq.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go build -o "$tmp/hangar" ./cmd/hangar

pools() {
	printf '[providers.local]\ntype = "local"\nboot_delay = "60s"\n'
	for p in "$@"; do
		printf '\n[pools.%s]\nprovider = "local"\nmax_instances = 200\n' "$p"
	done
}
pools linux windows macos >"$tmp/bitcoin-core.toml"
pools demo >"$tmp/synthetic.toml"

fail=0
for trace in synthetic bitcoin-core; do
	"$tmp/hangar" simulate --config "$tmp/$trace.toml" --trace "pool/sim/traces/$trace.csv" \
		--boot 60s --policy all --grid -o json >"$tmp/$trace.json"
	jq -r --arg t "$trace" '
		.oracle.instance_hours as $o
		| ([.policies[] | select(.name == "on-demand")][0].wait_p95_s) as $od
		| [.policies[] | select(.name == "grid")] as $g
		| [.policies[] | select(.name == "auto")][0] as $a
		| [$g[] | select(.instance_hours < $a.instance_hours and .wait_p95_s < $a.wait_p95_s)] as $dom
		| "\($t): auto p95 \($a.wait_p95_s)s (\($a.wait_p95_s / $od * 100 | round)% of on-demand) at \($a.instance_hours | round) h (\($a.instance_hours / $o * 100 | round / 100)x oracle)",
		  (if ($dom | length) == 0 then "  not dominated by the grid"
		   else "  DOMINATED by " + ([$dom[] | "min_idle \(.min_idle), idle_ttd \(.idle_ttd_s)s: \(.wait_p95_s)s at \(.instance_hours | round) h"] | join("; ")) end)
	' "$tmp/$trace.json"
	if ! jq -e '[.policies[] | select(.name == "auto")][0] as $a
		| [.policies[] | select(.name == "grid" and .instance_hours < $a.instance_hours and .wait_p95_s < $a.wait_p95_s)] | length == 0' \
		"$tmp/$trace.json" >/dev/null; then
		fail=1
	fi
done
exit $fail
