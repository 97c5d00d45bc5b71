package pool

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool/store"
)

func TestDrain(t *testing.T) {
	t.Run("leased: after its lease", func(t *testing.T) {
		h := newHarness(t, nil)
		h.warm(1)
		v, id := h.leaseOn(LeaseRequest{})
		view, err := h.m.Drain(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		h.settle()
		if view.State != Draining || h.state(id) != Draining || view.LeaseID != v.ID {
			t.Fatalf("drained leased instance: view %+v, state %s; want draining with its lease", view, h.state(id))
		}
		got := h.getLease(v.ID)
		if got.State != LeaseActive || got.Instance.ID != id || !got.ExpiresAt.Equal(v.ExpiresAt) {
			t.Fatalf("lease of a draining instance = %+v, want it untouched", got)
		}
		if a := h.poll(id, v.ID, 0); a.State != bootstrap.AssignNone {
			t.Fatalf("draining instance's worker told %q, want it left running", a.State)
		}
		if h.cloud.Terminated(id) {
			t.Fatal("a draining instance was terminated under its lease")
		}
		// A second drain changes nothing.
		if _, err := h.m.Drain(context.Background(), id); err != nil || h.state(id) != Draining {
			t.Fatalf("second drain: %v, state %s", err, h.state(id))
		}

		h.release(v.ID, false)
		h.settle()
		if got := h.state(id); got != Gone || !h.cloud.Terminated(id) {
			t.Fatalf("released draining instance: %s, terminated %v; want gone", got, h.cloud.Terminated(id))
		}
		if got := h.getLease(v.ID); got.State != LeaseReleased {
			t.Fatalf("lease %s, want released", got.State)
		}
	})
	t.Run("idle: at once", func(t *testing.T) {
		h := newHarness(t, nil)
		id := h.warm(1)[0]
		view, err := h.m.Drain(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if view.State != Terminating {
			t.Fatalf("drained idle instance is %s, want %s", view.State, Terminating)
		}
		h.settle()
		if got := h.state(id); got != Gone || !h.cloud.Terminated(id) {
			t.Fatalf("drained idle instance: %s, terminated %v; want gone", got, h.cloud.Terminated(id))
		}
		if _, err := h.m.Drain(context.Background(), id); !errors.Is(err, ErrUnknownInstance) {
			t.Fatalf("drain of a gone instance: %v, want ErrUnknownInstance", err)
		}
		// It is not handed out any more.
		if v := h.lease(LeaseRequest{}); v.State != LeasePending {
			t.Fatalf("lease after the only instance was drained is %s, want pending", v.State)
		}
	})
	t.Run("unknown", func(t *testing.T) {
		h := newHarness(t, nil)
		if _, err := h.m.Drain(context.Background(), "i-nope"); !errors.Is(err, ErrUnknownInstance) {
			t.Fatalf("drain of an unknown instance: %v, want ErrUnknownInstance", err)
		}
	})
}

func TestLeaseTTL(t *testing.T) {
	h := newHarness(t, nil)
	id := h.warm(1)[0]
	v, _ := h.leaseOn(LeaseRequest{TTL: 10 * time.Minute})
	if want := h.clock.Now().Add(10 * time.Minute); !v.ExpiresAt.Equal(want) {
		t.Fatalf("lease expires at %s, want %s", v.ExpiresAt, want)
	}

	h.clock.Advance(9 * time.Minute)
	h.tick()
	renewed, err := h.m.Renew(context.Background(), Admin, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if want := h.clock.Now().Add(10 * time.Minute); !renewed.ExpiresAt.Equal(want) || renewed.State != LeaseActive {
		t.Fatalf("renewed lease %+v, want active until %s", renewed, want)
	}
	// Past the first expiry, within the renewed one.
	h.clock.Advance(9 * time.Minute)
	h.tick()
	if got := h.getLease(v.ID); got.State != LeaseActive || h.state(id) != Leased {
		t.Fatalf("renewed lease is %s, instance %s; want active and leased", got.State, h.state(id))
	}
	// Exactly at expiry it still holds.
	h.clock.Advance(time.Minute)
	h.tick()
	if got := h.getLease(v.ID); got.State != LeaseActive {
		t.Fatalf("lease at its expiry instant is %s, want active", got.State)
	}

	h.clock.Advance(time.Second)
	h.tick()
	if got := h.getLease(v.ID); got.State != LeaseExpired {
		t.Fatalf("lease past its expiry is %s, want %s", got.State, LeaseExpired)
	}
	// Its holder vanished mid-build: the machine is not reused.
	if got := h.state(id); got != Gone || !h.cloud.Terminated(id) {
		t.Fatalf("instance of an expired lease: %s, terminated %v; want gone", got, h.cloud.Terminated(id))
	}
	if _, err := h.m.Renew(context.Background(), Admin, v.ID); !errors.Is(err, ErrLeaseEnded) {
		t.Fatalf("renew of an expired lease: %v, want ErrLeaseEnded", err)
	}
	if err := h.m.Release(context.Background(), Admin, v.ID, false); err != nil {
		t.Fatalf("release of an expired lease: %v, want a no-op", err)
	}
	if _, err := h.m.Renew(context.Background(), Admin, "l-nope"); !errors.Is(err, ErrUnknownLease) {
		t.Fatalf("renew of an unknown lease: %v, want ErrUnknownLease", err)
	}

	// Ended leases are readable for a while, then forgotten.
	h.clock.Advance(endedKept + time.Second)
	h.tick()
	if _, err := h.m.GetLease(context.Background(), Admin, v.ID, 0); !errors.Is(err, ErrUnknownLease) {
		t.Fatalf("lease long after it ended: %v, want ErrUnknownLease", err)
	}
}

func TestRenewOfReleasedLease(t *testing.T) {
	h := newHarness(t, nil)
	h.warm(1)
	v, _ := h.leaseOn(LeaseRequest{})
	h.release(v.ID, false)
	if _, err := h.m.Renew(context.Background(), Admin, v.ID); !errors.Is(err, ErrLeaseEnded) {
		t.Fatalf("renew of a released lease: %v, want ErrLeaseEnded", err)
	}
}

func TestPendingLeaseAbandoned(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 1 })
	id := h.warm(1)[0]
	holder, _ := h.leaseOn(LeaseRequest{})

	abandoned := h.pendingLease(LeaseRequest{Wait: 30 * time.Second})
	asked := h.pendingLease(LeaseRequest{Wait: 30 * time.Second})
	if got := h.pool().LeasesPending; got != 2 {
		t.Fatalf("pending leases = %d, want 2", got)
	}
	h.clock.Advance(2 * time.Minute)
	// Its client comes back for one of them.
	if got := h.getLease(asked.ID); got.State != LeasePending {
		t.Fatalf("lease %s is %s, want pending", asked.ID, got.State)
	}
	h.clock.Advance(30 * time.Second) // wait + pendingGrace after the request
	h.tick()
	// Not GetLease: asking after it would keep it.
	if got := h.leaseState(abandoned.ID); got != LeasePending {
		t.Fatalf("lease at wait+2m is %s, want still pending", got)
	}
	h.clock.Advance(time.Second)
	h.tick()
	if got := h.getLease(abandoned.ID); got.State != LeaseCanceled {
		t.Fatalf("lease not asked after for wait+2m is %s, want %s", got.State, LeaseCanceled)
	}
	if got := h.getLease(asked.ID); got.State != LeasePending {
		t.Fatalf("lease asked after is %s, want pending", got.State)
	}
	if got := h.pool().LeasesPending; got != 1 {
		t.Fatalf("pending leases = %d, want 1: the abandoned one leaves the queue", got)
	}
	h.m.mu.Lock()
	queue := slices.Clone(h.m.pools["demo"].queue)
	h.m.unlock()
	if len(queue) != 1 || queue[0].ID != asked.ID {
		t.Fatalf("queue %v, want only %s", queue, asked.ID)
	}

	// The instance goes to the lease still wanted.
	h.release(holder.ID, false)
	h.cleanRelease(id, holder.ID)
	if got := h.getLease(asked.ID); got.State != LeaseActive || got.Instance.ID != id {
		t.Fatalf("lease still wanted = %+v, want active on %s", got, id)
	}
	if got := h.getLease(abandoned.ID); got.State != LeaseCanceled {
		t.Fatalf("abandoned lease is %s, want canceled", got.State)
	}
}

func TestReleaseOfPendingLeaseCancelsIt(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 1 })
	h.warm(1)
	h.leaseOn(LeaseRequest{})
	v := h.pendingLease(LeaseRequest{})
	h.release(v.ID, false)
	if got := h.getLease(v.ID); got.State != LeaseCanceled || h.pool().LeasesPending != 0 {
		t.Fatalf("released pending lease is %s with %d pending, want canceled and none", got.State, h.pool().LeasesPending)
	}
}

func TestLeaseClientTokenIsIdempotent(t *testing.T) {
	h := newHarness(t, nil)
	first := h.lease(LeaseRequest{ClientToken: "build-42"})
	h.settle()
	again := h.lease(LeaseRequest{ClientToken: "build-42"})
	other := h.lease(LeaseRequest{ClientToken: "build-43"})
	none1 := h.lease(LeaseRequest{})
	none2 := h.lease(LeaseRequest{})
	h.settle()
	if again.ID != first.ID {
		t.Fatalf("same client token: lease %s, want %s", again.ID, first.ID)
	}
	if ids := []string{first.ID, other.ID, none1.ID, none2.ID}; len(slices.Compact(slices.Sorted(slices.Values(ids)))) != 4 {
		t.Fatalf("lease ids %v, want 4 different", ids)
	}
	if n := h.cloud.Count("launch"); n != 4 {
		t.Fatalf("launch calls = %d, want 4: a repeated request launches nothing", n)
	}
	if got := h.pool().LeasesPending; got != 4 {
		t.Fatalf("pending leases = %d, want 4", got)
	}
	// Still the same once it is active, and after it ended.
	id := h.ids(Booting)[0]
	h.ready(id)
	if got := h.lease(LeaseRequest{ClientToken: "build-42"}); got.ID != first.ID || got.State != LeaseActive {
		t.Fatalf("same client token on an active lease: %s %s, want %s active", got.ID, got.State, first.ID)
	}
	h.release(first.ID, false)
	if got := h.lease(LeaseRequest{ClientToken: "build-42"}); got.ID != first.ID || got.State != LeaseReleased {
		t.Fatalf("same client token on an ended lease: %s %s, want %s released", got.ID, got.State, first.ID)
	}
}

func TestPendingLeasesServedInRequestOrder(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 1 })
	var leases []LeaseView
	for range 3 {
		leases = append(leases, h.lease(LeaseRequest{}))
		h.clock.Advance(time.Second)
	}
	h.settle()
	if n := h.cloud.Count("launch"); n != 1 {
		t.Fatalf("launch calls = %d, want 1 (max_instances)", n)
	}
	id := h.only(Booting)
	h.ready(id)
	for i, l := range leases {
		for j, other := range leases[i+1:] {
			if got := h.getLease(other.ID); got.State != LeasePending {
				t.Fatalf("lease %d is %s while lease %d holds the instance, want pending", i+j+1, got.State, i)
			}
		}
		got := h.getLease(l.ID)
		if got.State != LeaseActive || got.Instance.ID != id {
			t.Fatalf("lease %d = %+v, want active on %s", i, got, id)
		}
		if a := h.poll(id, "", 0); a.State != bootstrap.AssignAssigned || a.LeaseID != l.ID {
			t.Fatalf("instance assigned %+v, want lease %d (%s)", a, i, l.ID)
		}
		h.release(l.ID, false)
		if h.state(id) != Releasing {
			t.Fatalf("released instance is %s, want %s", h.state(id), Releasing)
		}
		if a := h.poll(id, l.ID, 0); a.State != bootstrap.AssignReleased {
			t.Fatalf("worker of released lease %d told %q, want %q", i, a.State, bootstrap.AssignReleased)
		}
		if i+1 == len(leases) {
			if a := h.poll(id, "", 0); a.State != bootstrap.AssignNone || h.state(id) != Idle {
				t.Fatalf("clean poll with no lease waiting: %q, state %s; want none and idle", a.State, h.state(id))
			}
			break
		}
		// Its clean poll finds the next lease at once, not after the
		// long-poll times out.
		start := time.Now()
		a := h.poll(id, "", 3*time.Second)
		if a.State != bootstrap.AssignAssigned || a.LeaseID != leases[i+1].ID {
			t.Fatalf("clean poll after lease %d: %+v after %s, want lease %s at once", i, a, time.Since(start), leases[i+1].ID)
		}
	}
	if n := h.cloud.Count("launch"); n != 1 {
		t.Fatalf("launch calls = %d, want 1: the instance is reused", n)
	}
	if got := h.instance(id).Uses; got != 3 {
		t.Fatalf("instance uses = %d, want 3", got)
	}
}

// Run's timer decisions are committed when they are made, as every other
// decision is: a pending lease that Run's timer cancels is canceled on
// disk, with nothing else happening after it.
func TestRunCommitsTimerDecisions(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.MaxInstances = 1 })
	h.m.mu.Lock()
	h.m.pools["demo"].blocked = true // nothing launches: the lease stays pending
	h.m.unlock()
	v := h.pendingLease(LeaseRequest{Wait: 30 * time.Second})
	h.m.opts.ReconcileInterval = time.Hour // no reconcile to commit for the timer
	h.run()
	h.clock.Advance(time.Minute)
	testutil.Eventually(t, "the pending lease to be canceled", 10*time.Second, func() bool {
		h.clock.Advance(time.Second)
		// A peek that commits nothing itself.
		h.m.mu.Lock()
		defer h.m.mu.Unlock()
		return h.m.leases[v.ID].State == LeaseCanceled
	})
	h.stopRun()
	// A barrier: it waits for what is queued, and queues nothing itself.
	if err := h.store.CommitWait(); err != nil {
		t.Fatal(err)
	}
	onDisk, err := store.Load[Lease](h.store, store.Leases)
	if err != nil {
		t.Fatal(err)
	}
	if got := onDisk[v.ID].State; got != LeaseCanceled {
		t.Errorf("the canceled lease is %q on disk, want %q", got, LeaseCanceled)
	}
}
