package pool

import (
	"testing"

	"github.com/hangar-ci/hangar/metrics"
	"github.com/hangar-ci/hangar/pool/store"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
)

// TestAssignIsOneTransaction: the lease and its instance's half of an
// assignment are committed together. Written one after the other, a crash
// between them left a lease active on an instance recorded idle, which the
// restarted server then leased to a second build.
func TestAssignIsOneTransaction(t *testing.T) {
	h := newHarness(t, nil)
	id := h.warm(1)[0]
	v := h.lease(LeaseRequest{Wait: 0, Command: nil, ClientToken: ""})
	if v.State != LeaseActive {
		t.Fatalf("lease is %s, want active", v.State)
	}
	h.release(v.ID, false)
	h.cleanRelease(id, v.ID)

	h.m.mu.Lock()
	in := h.m.byID[id]
	l := &Lease{ID: "l-onetx", Pool: "demo", State: LeasePending, CreatedAt: h.clock.Now(), TTL: 3600e9}
	h.m.leases[l.ID] = l
	before := h.m.lastSave
	h.m.assignLocked(l, in)
	commitsDuring := h.m.lastSave != before
	var wrote []string
	for _, op := range h.m.ops {
		wrote = append(wrote, string(op.Kind)+"/"+op.ID)
	}
	h.m.unlock()
	if commitsDuring {
		t.Fatal("assignLocked committed part of the assignment before the decision ended")
	}
	want := map[string]bool{"leases/" + l.ID: true, "instances/" + in.Key: true}
	for _, w := range wrote {
		delete(want, w)
	}
	if len(want) != 0 {
		t.Fatalf("decision wrote %v; missing %v", wrote, want)
	}
}

// tornStore writes records behind the manager's back, as an older version or
// a torn write left them, and restarts on them.
func tornRestart(t *testing.T, h *harness, ops ...store.Op) *prometheus.Registry {
	t.Helper()
	h.shutdown()
	s, err := store.Open(h.path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CommitWait(ops...); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	h.metrics = metrics.New(reg, func() metrics.Snapshot { return metrics.Snapshot{} })
	h.open()
	return reg
}

func TestRestoreRepairs(t *testing.T) {
	t.Run("active lease on an idle instance is completed, and nobody else gets the instance", func(t *testing.T) {
		h := newHarness(t, nil)
		id := h.warm(1)[0]
		in := h.instance(id)
		l := &Lease{ID: "l-torn", Pool: "demo", State: LeaseActive, InstanceKey: in.Key, CreatedAt: h.clock.Now(), AssignedAt: h.clock.Now(), ExpiresAt: h.clock.Now().Add(3600e9), TTL: 3600e9}
		tornRestart(t, h, store.Op{Kind: store.Leases, ID: l.ID, Value: l})
		got := h.instance(id)
		if got.State != Leased || got.LeaseID != l.ID {
			t.Fatalf("instance %s is %s with lease %q; want leased by %s", id, got.State, got.LeaseID, l.ID)
		}
		if v := h.getLease(l.ID); v.State != LeaseActive {
			t.Fatalf("lease %s is %s, want active", l.ID, v.State)
		}
		if v := h.lease(LeaseRequest{}); v.State != LeasePending {
			t.Fatalf("second lease is %s on %v: two builds on one machine", v.State, v.Instance)
		}
		if n := promtest.ToFloat64(h.metrics.StoreRepairs.WithLabelValues("lease_reattached")); n != 1 {
			t.Fatalf("hangar_store_repairs_total{kind=lease_reattached} = %v, want 1", n)
		}
		// Durable: a second restart finds nothing left to mend.
		tornRestart(t, h)
		if n := promtest.ToFloat64(h.metrics.StoreRepairs.WithLabelValues("lease_reattached")); n != 0 {
			t.Fatalf("repair was not saved: repaired again after restart")
		}
	})
	t.Run("lease on a missing instance is lost", func(t *testing.T) {
		h := newHarness(t, nil)
		l := &Lease{ID: "l-nowhere", Pool: "demo", State: LeaseActive, InstanceKey: "h-missing", CreatedAt: h.clock.Now(), ExpiresAt: h.clock.Now().Add(3600e9), TTL: 3600e9}
		tornRestart(t, h, store.Op{Kind: store.Leases, ID: l.ID, Value: l})
		if v := h.getLease(l.ID); v.State != LeaseLost {
			t.Fatalf("lease is %s, want lost", v.State)
		}
		if n := promtest.ToFloat64(h.metrics.StoreRepairs.WithLabelValues("lease_instance_missing")); n != 1 {
			t.Fatalf("repairs counted %v, want 1", n)
		}
	})
	t.Run("two active leases on one instance: the one it names keeps it", func(t *testing.T) {
		h := newHarness(t, nil)
		id := h.warm(1)[0]
		keep := h.lease(LeaseRequest{})
		in := h.instance(id)
		other := &Lease{ID: "l-second", Pool: "demo", State: LeaseActive, InstanceKey: in.Key, CreatedAt: h.clock.Now(), ExpiresAt: h.clock.Now().Add(3600e9), TTL: 3600e9}
		tornRestart(t, h, store.Op{Kind: store.Leases, ID: other.ID, Value: other})
		if v := h.getLease(keep.ID); v.State != LeaseActive {
			t.Fatalf("the instance's own lease is %s, want active", v.State)
		}
		if v := h.getLease(other.ID); v.State != LeaseLost {
			t.Fatalf("the second lease is %s, want lost", v.State)
		}
		if got := h.instance(id); got.State != Leased || got.LeaseID != keep.ID {
			t.Fatalf("instance is %s with %q, want leased by %s", got.State, got.LeaseID, keep.ID)
		}
	})
	t.Run("instance leased by a released lease is released", func(t *testing.T) {
		h := newHarness(t, nil)
		id := h.warm(1)[0]
		v := h.lease(LeaseRequest{})
		h.m.mu.Lock()
		l := *h.m.leases[v.ID]
		h.m.unlock()
		l.State, l.EndedAt = LeaseReleased, h.clock.Now()
		tornRestart(t, h, store.Op{Kind: store.Leases, ID: l.ID, Value: &l})
		if got := h.instance(id); got.State != Releasing || got.LeaseID != "" {
			t.Fatalf("instance is %s with lease %q, want releasing with none", got.State, got.LeaseID)
		}
	})
	t.Run("instance leased with no lease is terminated", func(t *testing.T) {
		h := newHarness(t, nil)
		id := h.warm(1)[0]
		in := h.instance(id)
		in.State, in.LeaseID = Leased, ""
		tornRestart(t, h, store.Op{Kind: store.Instances, ID: in.Key, Value: &in})
		if got := h.instance(id); got.State != Terminating {
			t.Fatalf("instance is %s, want terminating", got.State)
		}
		if _, err := h.authenticate(id); err == nil {
			t.Fatal("a terminating instance's token still works")
		}
	})
}
