package testutil

import (
	"testing"
	"time"
)

// Eventually polls cond every few milliseconds until it holds, failing the
// test with what was awaited when within passes first. It measures real
// time: it waits for other goroutines and processes, never for a FakeClock.
func Eventually(t testing.TB, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
