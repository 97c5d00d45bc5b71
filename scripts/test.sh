#!/usr/bin/env bash
# The project's test command (README.md): vet, lint, then every test with the
# race detector. Extra arguments go to `go test`, e.g. scripts/test.sh -run Lease.
# HANGAR_REQUIRE_TOOLS=1 (set by .ci/run) fails, rather than skips, a test
# whose tool (cloud-init, sshd, rsync, boto3, Buildbot…) is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
go vet ./...

# golangci-lint, pinned, with .golangci.yml. Compiling it takes minutes (19
# on a busy 2-core machine, 5 of CPU), so it is built once per version into a
# cache directory (per Go version too: a linter built by an older Go refuses
# newer code) and reused; set GOLANGCI_LINT to use another binary.
golangci_lint_version=v2.15.0
lint=${GOLANGCI_LINT:-}
if [[ -z $lint ]]; then
	lint_dir=${HANGAR_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar/tools}/golangci-lint-$golangci_lint_version-$(go env GOVERSION)
	lint=$lint_dir/golangci-lint
	if [[ ! -x $lint ]]; then
		echo "building golangci-lint $golangci_lint_version into $lint_dir (once per machine)" >&2
		GOBIN=$lint_dir go install "github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$golangci_lint_version"
	fi
fi
# Every package: a new finding fails CI.
"$lint" run ./...

go test -race -count=1 -timeout 20m "$@" ./...
