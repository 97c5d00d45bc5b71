package pool

import (
	"errors"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// The gauges operators alert on: how long the oldest pending lease has
// waited, how long an instance has been in its state, and when reconcile
// last applied a listing, which a failed listing leaves as it was.
func TestSnapshotAges(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 1 })
	booting := [2]string{"demo", string(Booting)}
	idle := [2]string{"demo", string(Idle)}

	s := h.m.Snapshot()
	if at, ok := s.ReconciledAt["demo"]; !ok || !at.IsZero() {
		t.Errorf("before any reconcile: ReconciledAt = %v (present %v), want the zero time", at, ok)
	}
	if d, ok := s.OldestPending["demo"]; !ok || d != 0 {
		t.Errorf("no lease: OldestPending = %v (present %v), want 0", d, ok)
	}

	reconciled := h.clock.Now()
	h.reconcile()
	v := h.pendingLease(LeaseRequest{Wait: 10 * time.Minute})
	h.settle()
	id := h.only(Booting)
	h.clock.Advance(3 * time.Minute)
	s = h.m.Snapshot()
	if got := s.OldestPending["demo"]; got != 3*time.Minute {
		t.Errorf("a lease pending for 3m: OldestPending = %v", got)
	}
	if got := s.LongestInState[booting]; got != 3*time.Minute {
		t.Errorf("an instance booting for 3m: LongestInState[booting] = %v", got)
	}
	if got, ok := s.LongestInState[idle]; !ok || got != 0 {
		t.Errorf("no idle instance: LongestInState[idle] = %v (present %v), want 0", got, ok)
	}
	if got := s.ReconciledAt["demo"]; !got.Equal(reconciled) {
		t.Errorf("ReconciledAt = %v, want the reconcile's %v", got, reconciled)
	}

	h.cloud.FailAll("list", errors.Join(errors.New("injected"), cloud.ErrThrottled))
	h.clock.Advance(time.Minute)
	h.reconcile()
	if got := h.m.Snapshot().ReconciledAt["demo"]; !got.Equal(reconciled) {
		t.Errorf("after a failed listing ReconciledAt = %v, want it kept at %v", got, reconciled)
	}
	h.cloud.FailAll("list", nil)
	h.reconcile()
	if got := h.m.Snapshot().ReconciledAt["demo"]; !got.Equal(h.clock.Now()) {
		t.Errorf("after a good listing ReconciledAt = %v, want %v", got, h.clock.Now())
	}

	h.ready(id)
	if got := h.getLease(v.ID); got.State != LeaseActive {
		t.Fatalf("lease is %s, want active", got.State)
	}
	s = h.m.Snapshot()
	if got := s.OldestPending["demo"]; got != 0 {
		t.Errorf("nothing pending: OldestPending = %v, want 0", got)
	}
	if got := s.LongestInState[booting]; got != 0 {
		t.Errorf("nothing booting: LongestInState[booting] = %v, want 0", got)
	}
}
