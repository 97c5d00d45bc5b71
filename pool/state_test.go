package pool

import (
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/metrics"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
)

// quietHarness is a harness whose illegal transitions are counted, not
// panicked on, so that a test can walk them.
func quietHarness(t *testing.T) *harness {
	h := newHarness(t, nil)
	h.shutdown()
	h.metrics = metrics.New(prometheus.NewRegistry(), func() metrics.Snapshot { return metrics.Snapshot{} })
	h.open()
	h.m.panicOnIllegal = false
	return h
}

// The transitions the design relies on, and some it forbids.
func TestInstanceTransitionTable(t *testing.T) {
	cases := []struct {
		from, to State
		ok       bool
	}{
		{Launching, Booting, true},
		{Launching, Idle, true}, // its ready report beat the launch answer
		{Booting, Idle, true},
		{Idle, Leased, true},
		{Leased, Releasing, true},
		{Releasing, Idle, true},
		{Leased, Draining, true},
		{Draining, Terminating, true},
		{Idle, Stopping, true},
		{Stopping, Stopped, true},
		{Stopped, Starting, true},
		{Starting, Booting, true},
		{Terminating, Gone, true},

		{Idle, Booting, false},
		{Idle, Launching, false},
		{Leased, Idle, false}, // not before its worker has stopped
		{Draining, Leased, false},
		{Draining, Idle, false},
		{Booting, Leased, false},
		{Stopped, Idle, false},
		{Terminating, Idle, false},
		{Gone, Idle, false},
		{Gone, Terminating, false},
		{Booting, Terminating, true}, // boot_timeout
	}
	for _, c := range cases {
		if got := slices.Contains(transitions[c.from], c.to); got != c.ok {
			t.Errorf("%s → %s allowed = %v, want %v", c.from, c.to, got, c.ok)
		}
	}
	for from, tos := range transitions {
		for _, to := range tos {
			if _, ok := transitions[to]; !ok {
				t.Errorf("%s → %s leads to a state with no transitions entry", from, to)
			}
		}
	}
}

// TestSetStateWalk walks every pair of instance states through the one
// setter: allowed ones change the record and queue it; every other is
// refused, changes nothing, and is counted (and would panic under test).
func TestSetStateWalk(t *testing.T) {
	h := quietHarness(t)
	before := h.clock.Now()
	h.clock.Advance(time.Minute)
	states := slices.Sorted(maps.Keys(transitions))
	illegal := 0
	for _, from := range states {
		for _, to := range states {
			if from == to {
				continue
			}
			ok := slices.Contains(transitions[from], to)
			in := &Instance{Key: "h-" + string(from) + "-" + string(to), ID: "i-test", Pool: "demo", State: from, Since: before, Reason: "old"}
			h.m.mu.Lock()
			queuedBefore := len(h.m.ops)
			h.m.setState(in, to, "test")
			queued := len(h.m.ops) > queuedBefore
			h.m.unlock()
			switch {
			case ok && (!queued || in.State != to || !in.Since.Equal(h.clock.Now()) || in.Reason != "test"):
				t.Errorf("%s → %s: instance %s since %s (%s), queued %v; want %s now, queued", from, to, in.State, in.Since, in.Reason, queued, to)
			case !ok && (queued || in.State != from || !in.Since.Equal(before) || in.Reason != "old"):
				t.Errorf("refused %s → %s changed the instance: %s since %s (%s), queued %v", from, to, in.State, in.Since, in.Reason, queued)
			}
			if !ok {
				illegal++
			}
		}
	}
	if n := promtest.ToFloat64(h.metrics.IllegalTransitions.WithLabelValues("instance")); n != float64(illegal) {
		t.Errorf("hangar_illegal_transitions_total{machine=instance} = %v, want %d", n, illegal)
	}
	in := &Instance{Key: "h-same", Pool: "demo", State: Idle, Since: before}
	h.m.mu.Lock()
	h.m.setState(in, Idle, "again")
	h.m.unlock()
	if !in.Since.Equal(before) {
		t.Fatalf("setState to the same state moved since to %s; want a no-op", in.Since)
	}
}

// TestLeaseStateWalk: the same for leases, whose states were assigned
// directly before.
func TestLeaseStateWalk(t *testing.T) {
	h := quietHarness(t)
	states := slices.Sorted(maps.Keys(leaseTransitions))
	illegal := 0
	for _, from := range states {
		for _, to := range states {
			ok := slices.Contains(leaseTransitions[from], to)
			l := &Lease{ID: fmt.Sprintf("l-%s-%s", from, to), Pool: "demo", State: from}
			h.m.mu.Lock()
			queuedBefore := len(h.m.ops)
			changed := h.m.setLeaseState(l, to)
			queued := len(h.m.ops) > queuedBefore
			h.m.unlock()
			switch {
			case ok && (!changed || !queued || l.State != to || to.ended() != !l.EndedAt.IsZero()):
				t.Errorf("%s → %s: changed %v, queued %v, lease %s ended at %s", from, to, changed, queued, l.State, l.EndedAt)
			case !ok && (changed || queued || l.State != from):
				t.Errorf("refused %s → %s: changed %v, queued %v, lease %s", from, to, changed, queued, l.State)
			}
			if !ok {
				illegal++
			}
		}
	}
	if n := promtest.ToFloat64(h.metrics.IllegalTransitions.WithLabelValues("lease")); n != float64(illegal) {
		t.Errorf("hangar_illegal_transitions_total{machine=lease} = %v, want %d", n, illegal)
	}
	for _, s := range states {
		if s.ended() != (len(leaseTransitions[s]) == 0) {
			t.Errorf("lease state %s: ended %v but %d transitions out", s, s.ended(), len(leaseTransitions[s]))
		}
	}
}

// Under go test an illegal transition panics, so no test passes over one.
func TestIllegalTransitionPanicsUnderTest(t *testing.T) {
	h := newHarness(t, nil)
	defer func() {
		if recover() == nil {
			t.Fatal("an illegal transition did not panic under go test")
		}
		h.m.mu.Unlock()
	}()
	h.m.mu.Lock()
	h.m.setState(&Instance{Key: "h-x", Pool: "demo", State: Gone}, Idle, "test")
}
