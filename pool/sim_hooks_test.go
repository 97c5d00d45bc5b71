package pool

import (
	"context"
	"maps"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/pool/store"
)

// countsAgree checks each pool's count of instances by state against a
// walk over every instance.
func countsAgree(t *testing.T, m *Manager, when string) {
	t.Helper()
	m.mu.Lock()
	defer m.unlock()
	for name, p := range m.pools {
		walk := map[State]int{}
		idle := map[string]*Instance{}
		for _, in := range m.instances {
			if in.Pool == name {
				walk[in.State]++
				if in.State == Idle {
					idle[in.Key] = in
				}
			}
		}
		if !maps.Equal(idle, p.idle) {
			t.Errorf("%s: pool %s has %d idle instances, but %d are listed idle", when, name, len(idle), len(p.idle))
		}
		got := map[State]int{}
		for st, n := range p.count {
			if n != 0 {
				got[st] = n
			}
		}
		if !maps.Equal(got, walk) {
			t.Errorf("%s: pool %s counts %v, but its instances are %v", when, name, got, walk)
		}
	}
}

// TestCountsFollowInstances: the per-state counts dispatch relies on agree
// with the instances through launches, leases, releases, reaping, drains,
// forgetting and a restart.
func TestCountsFollowInstances(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.IdleTTD = time.Minute })
	ids := h.warm(3)
	countsAgree(t, h.m, "warm")
	v, id := h.leaseOn(LeaseRequest{})
	countsAgree(t, h.m, "leased")
	h.release(v.ID, false)
	countsAgree(t, h.m, "released")
	h.cleanRelease(id, v.ID)
	countsAgree(t, h.m, "worker stopped")
	if _, err := h.m.Drain(context.Background(), ids[0]); err != nil {
		t.Fatal(err)
	}
	h.settle()
	countsAgree(t, h.m, "drained")
	for range 3 { // two idle ones taken, and a launch
		h.lease(LeaseRequest{})
	}
	h.settle()
	countsAgree(t, h.m, "a lease that launches")
	h.clock.Advance(2 * time.Minute)
	h.tick()
	countsAgree(t, h.m, "reaped")
	h.restart()
	countsAgree(t, h.m, "restarted")
	h.clock.Advance(2 * time.Hour)
	h.tick()
	countsAgree(t, h.m, "gone ones forgotten")
}

// TestStepAndSettle: a Manager made for a simulation makes its cloud calls
// only when settled, in order, and Step reaps by its clock.
func TestStepAndSettle(t *testing.T) {
	clock := newFakeClock()
	fc := newFakeCloud(clock)
	o := testOptions(func(p *Spec) { p.MinIdle, p.IdleTTD = 2, time.Minute })
	o.Providers = map[string]cloud.Provider{"fake": fc}
	o.Store, o.Clock = store.Discard(), clock
	var events []Event
	o.Simulation = &Simulation{Observe: func(e Event) { events = append(events, e) }}
	m, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = m.Close() }()
	ctx := context.Background()
	m.mu.Lock()
	m.dispatchLocked()
	m.unlock()
	if n := fc.Count("launch"); n != 0 {
		t.Fatalf("%d launches before Settle, want none", n)
	}
	m.Settle(ctx)
	if n := fc.Count("launch"); n != 2 {
		t.Fatalf("%d launches after Settle, want 2 (min_idle)", n)
	}
	if len(events) != 2 || events[0].To != Booting {
		t.Errorf("observed %v, want the two instances booting", events)
	}
}
