// Package chaos holds Hangar's crash test: `go test ./test/chaos` runs a real
// `hangar serve` on the local cloud, has 16 clients lease, renew and release
// through the HTTP API while the server is killed with SIGKILL (some runs
// slowed under strace) and restarted 30 times and more, and checks that
// nothing acknowledged to a client was lost or undone, that no instance
// was leased twice at once, that max_instances held in the store and on the
// local cloud, and that scaling the pool to zero leaves no instance process.
//
// The package has no code of its own; see chaos_test.go.
package chaos
