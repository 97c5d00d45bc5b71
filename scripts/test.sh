#!/usr/bin/env bash
# The project's test command (README.md): vet, then every test with the race
# detector. Extra arguments go to `go test`, e.g. scripts/test.sh -run Lease.
set -euo pipefail
cd "$(dirname "$0")/.."
go vet ./...
go test -race -count=1 -timeout 20m "$@" ./...
