package pool

import (
	"context"
	"testing"
	"time"
)

// TestUnclaimedLeaseReleased: a lease fulfilled after its creator stopped
// waiting (a POST cut by a crash or a client timeout) and that nobody
// fetches within claim_timeout gives its instance back, instead of holding
// it for the whole lease ttl.
func TestUnclaimedLeaseReleased(t *testing.T) {
	claim := 2 * time.Minute
	t.Run("nobody fetches it", func(t *testing.T) {
		h := newHarness(t, nil)
		v := h.pendingLease(LeaseRequest{}) // answered 202; the client vanishes
		h.settle()
		id := h.only(Booting)
		h.ready(id)
		if got := h.instance(id); got.State != Leased || got.LeaseID != v.ID {
			t.Fatalf("instance %s is %s for %q, want leased for %s", id, got.State, got.LeaseID, v.ID)
		}
		h.clock.Advance(claim)
		h.tick()
		if st := h.leaseState(v.ID); st != LeaseActive {
			t.Fatalf("lease at exactly claim_timeout is %s, want active", st)
		}
		h.clock.Advance(time.Second)
		h.tick()
		if st := h.leaseState(v.ID); st != LeaseReleased {
			t.Fatalf("unclaimed lease past claim_timeout is %s, want released", st)
		}
		if st := h.state(id); st != Releasing {
			t.Fatalf("its instance is %s, want releasing (back to the pool)", st)
		}
	})
	t.Run("fetched in time", func(t *testing.T) {
		h := newHarness(t, nil)
		v := h.pendingLease(LeaseRequest{})
		h.settle()
		h.ready(h.only(Booting))
		h.clock.Advance(claim - time.Second)
		if got := h.getLease(v.ID); got.State != LeaseActive {
			t.Fatalf("lease is %s, want active", got.State)
		}
		h.clock.Advance(30 * time.Minute) // within the ttl
		h.tick()
		if st := h.leaseState(v.ID); st != LeaseActive {
			t.Fatalf("claimed lease is %s before its ttl, want active", st)
		}
	})
	t.Run("fulfilled while its client waits", func(t *testing.T) {
		h := newHarness(t, nil)
		h.warm(1)
		v := h.lease(LeaseRequest{})
		h.clock.Advance(claim + time.Minute)
		h.tick()
		if st := h.leaseState(v.ID); st != LeaseActive {
			t.Fatalf("warm lease answered at once is %s after claim_timeout, want active", st)
		}
	})
	t.Run("survives a restart, then times out from it", func(t *testing.T) {
		h := newHarness(t, nil)
		v := h.pendingLease(LeaseRequest{})
		h.settle()
		h.ready(h.only(Booting))
		h.clock.Advance(claim + time.Minute)
		h.restart()
		h.tick()
		if st := h.leaseState(v.ID); st != LeaseActive {
			t.Fatalf("unclaimed lease right after a restart is %s, want active: its client may be coming back", st)
		}
		// A client coming back with its client token would claim it;
		// nobody does.
		h.clock.Advance(claim + time.Second)
		h.tick()
		if st := h.leaseState(v.ID); st != LeaseReleased {
			t.Fatalf("unclaimed lease claim_timeout after the restart is %s, want released", st)
		}
	})
	t.Run("a client that gave up does not claim", func(t *testing.T) {
		h := newHarness(t, nil)
		h.warm(1)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		v, err := h.m.Lease(ctx, Admin, LeaseRequest{Pool: "demo"})
		if err != nil {
			t.Fatal(err)
		}
		if v.State != LeaseActive {
			t.Fatalf("lease is %s, want active", v.State)
		}
		h.clock.Advance(claim + time.Second)
		h.tick()
		if st := h.leaseState(v.ID); st != LeaseReleased {
			t.Fatalf("lease whose request was gone is %s after claim_timeout, want released", st)
		}
	})
}
