package pool

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"time"
)

// Simulation makes a Manager fit for a simulation (package pool/sim), or
// for a test that drives it by hand: never for a server. With it, the
// Manager makes no goroutines: the cloud calls its decisions start are
// queued and made in order by Settle (or Step), on the caller's goroutine,
// so the same calls give the same results. Such a Manager must not Run.
type Simulation struct {
	// IDs is where instance keys and lease ids come from (nil:
	// crypto/rand), so that a seeded source gives the same ids, and so the
	// same tie-breaks, on every run. Never tokens or passwords: those
	// always come from crypto/rand.
	IDs io.Reader
	// EndedKept is how long ended leases and gone instances stay readable
	// (0: until the next Step); a server keeps them an hour, which a
	// simulation of a million leases has no use for.
	EndedKept time.Duration
	// Observe, when set, is told every pool event as it happens, under
	// the Manager's lock: it must not call the Manager.
	Observe func(Event)
}

// Step is one turn of Run's timer loop (timers, then dispatch) followed by
// Settle. For simulation and tests; never while Run runs.
func (m *Manager) Step(ctx context.Context) {
	m.mu.Lock()
	m.timersLocked()
	m.dispatchLocked()
	m.unlock()
	m.Settle(ctx)
}

// Reconcile is one of Run's reconciles followed by Settle. For simulation
// and tests; never while Run runs.
func (m *Manager) Reconcile(ctx context.Context) {
	m.reconcile(ctx)
	m.Settle(ctx)
}

// Settle makes the cloud calls under way or queued, and those their
// results start, until none is left. For simulation and tests; never
// while Run runs (Run's decisions would start more).
func (m *Manager) Settle(ctx context.Context) {
	for {
		m.deferredMu.Lock()
		if len(m.deferred) == 0 {
			m.deferredMu.Unlock()
			break
		}
		f := m.deferred[0]
		m.deferred = m.deferred[1:]
		m.deferredMu.Unlock()
		// The calls run under the manager's context, as those Run's
		// goroutines make do: a caller's ctx must not cut one short.
		f(m.ctx) //nolint:contextcheck // see above
	}
	m.wg.Wait()
}

// newID returns an id of n random bytes, from Simulation.IDs when set.
func (m *Manager) newID(n int) string {
	if m.ids == nil {
		return randomToken(n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(m.ids, b); err != nil {
		panic(fmt.Sprintf("reading simulation ids: %v", err))
	}
	return base64.RawURLEncoding.EncodeToString(b)
}
