package pool

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

func TestScaleInTakesOnlyIdleInstances(t *testing.T) {
	h := newHarness(t, nil)
	all := h.warm(4)
	a, leasedA := h.leaseOn(LeaseRequest{})
	b, leasedB := h.leaseOn(LeaseRequest{})
	idle := h.ids(Idle)
	if len(idle) != 2 {
		t.Fatalf("idle %v, want 2 of %v", idle, all)
	}

	one := 1
	v, err := h.m.Scale(context.Background(), "demo", nil, &one)
	if err != nil {
		t.Fatal(err)
	}
	h.settle()
	if v.MaxInstances != 1 {
		t.Fatalf("max_instances %d, want 1", v.MaxInstances)
	}
	for _, id := range idle {
		if got := h.state(id); got != Gone || !h.cloud.Terminated(id) {
			t.Errorf("idle instance %s after scale-in: %s, terminated %v; want gone", id, got, h.cloud.Terminated(id))
		}
	}
	for _, id := range []string{leasedA, leasedB} {
		if got := h.state(id); got != Leased || h.cloud.Terminated(id) {
			t.Errorf("leased instance %s after scale-in: %s, terminated %v; want leased", id, got, h.cloud.Terminated(id))
		}
	}
	for i := range 10 {
		h.clock.Advance(time.Duration(i) * time.Minute)
		h.tick()
	}
	for _, l := range []LeaseView{a, b} {
		if got := h.getLease(l.ID); got.State != LeaseActive {
			t.Errorf("lease %s after scale-in is %s, want active", l.ID, got.State)
		}
	}

	// A released one is still over the limit: it goes once idle.
	h.release(a.ID, false)
	h.cleanRelease(leasedA, a.ID)
	h.tick()
	if got := h.state(leasedA); got != Gone {
		t.Fatalf("released instance over max_instances is %s, want gone", got)
	}
	if got := h.state(leasedB); got != Leased {
		t.Fatalf("the other leased instance is %s, want leased", got)
	}
	// Now at the limit: the last one is kept when released.
	h.release(b.ID, false)
	h.cleanRelease(leasedB, b.ID)
	h.tick()
	if got := h.state(leasedB); got != Idle {
		t.Fatalf("released instance within max_instances is %s, want idle", got)
	}
}

func TestScaleValidation(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MinIdle, p.MaxInstances = 1, 4 })
	n := func(i int) *int { return &i }
	cases := []struct {
		name     string
		min, max *int
		want     string
	}{
		{"negative min", n(-1), nil, "min_idle must be ≥ 0"},
		{"negative max", n(0), n(-1), "max_instances must be ≥ 0"},
		{"max below min", n(3), n(2), "max_instances (2) must be ≥ min_idle (3)"},
		{"max below current min", nil, n(0), "max_instances (0) must be ≥ min_idle (1)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := h.m.Scale(context.Background(), "demo", c.min, c.max)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Scale: %v, want ErrInvalid with %q", err, c.want)
			}
			if p := h.pool(); p.MinIdle != 1 || p.MaxInstances != 4 {
				t.Fatalf("pool after a refused scale: %d/%d, want 1/4", p.MinIdle, p.MaxInstances)
			}
		})
	}
	if _, err := h.m.Scale(context.Background(), "nope", nil, nil); !errors.Is(err, ErrUnknownPool) {
		t.Fatalf("Scale of an unknown pool: %v", err)
	}
}

// A pool scaled to 0 ends its idle instances at once and launches nothing,
// not even for a lease; a leased one goes when it is released.
func TestScaleToZero(t *testing.T) {
	h := newHarness(t, nil)
	ids := h.warm(2)
	v := h.lease(LeaseRequest{})
	zero := 0
	if _, err := h.m.Scale(context.Background(), "demo", &zero, &zero); err != nil {
		t.Fatal(err)
	}
	h.settle()
	if got := h.cloud.Running(); len(got) != 1 || got[0] != v.Instance.ID {
		t.Fatalf("running after scaling to 0: %v, want only the leased %s (of %v)", got, v.Instance.ID, ids)
	}
	p := h.lease(LeaseRequest{})
	if p.State != LeasePending {
		t.Fatalf("a lease from a pool scaled to 0 is %s, want pending", p.State)
	}
	h.release(p.ID, false)
	h.release(v.ID, false)
	h.cleanRelease(v.Instance.ID, v.ID)
	h.tick()
	if got := h.cloud.Running(); len(got) != 0 {
		t.Fatalf("running after the last lease ended: %v, want none", got)
	}
}

func TestIdleReaping(t *testing.T) {
	for _, onIdle := range []string{"terminate", "stop"} {
		t.Run(onIdle, func(t *testing.T) {
			h := newHarness(t, func(p *Spec) { p.StopWhenIdle = onIdle == "stop" })
			ids := h.warm(3)
			one := 1
			if _, err := h.m.Scale(context.Background(), "demo", &one, nil); err != nil {
				t.Fatal(err)
			}
			ttd := h.opts.Pools["demo"].IdleTTD
			h.clock.Advance(ttd)
			h.tick()
			if got := h.ids(Idle); len(got) != 3 {
				t.Fatalf("idle at exactly idle_ttd: %v, want all 3", got)
			}
			h.clock.Advance(time.Second)
			h.tick()
			kept := h.ids(Idle)
			if len(kept) != 1 {
				t.Fatalf("idle after idle_ttd: %v, want the min_idle one", kept)
			}
			var reaped []string
			for _, id := range ids {
				if id != kept[0] {
					reaped = append(reaped, id)
				}
			}
			for _, id := range reaped {
				switch onIdle {
				case "terminate":
					if h.state(id) != Gone || !h.cloud.Terminated(id) {
						t.Errorf("reaped %s: %s, terminated %v", id, h.state(id), h.cloud.Terminated(id))
					}
				case "stop":
					if inst, _ := h.cloud.Instance(id); h.state(id) != Stopped || inst.State != cloud.StateStopped || h.cloud.Terminated(id) {
						t.Errorf("reaped %s: %s, cloud %s, terminated %v; want stopped", id, h.state(id), inst.State, h.cloud.Terminated(id))
					}
				}
			}
			h.reconcile() // stopped by us is not "stopped outside Hangar"
			for _, id := range reaped {
				if onIdle == "stop" && h.state(id) != Stopped {
					t.Errorf("after reconcile %s is %s, want stopped", id, h.state(id))
				}
			}

			// A lease takes the warm one; min_idle then wants a spare, which
			// a stopped instance gives faster than a launch.
			_, on := h.leaseOn(LeaseRequest{})
			if on != kept[0] {
				t.Fatalf("lease on %s, want the idle %s", on, kept[0])
			}
			h.settle()
			switch onIdle {
			case "terminate":
				if n := h.cloud.Count("launch"); n != 4 || len(h.ids(Booting)) != 1 {
					t.Fatalf("%d launch calls, booting %v; want a fourth launch", n, h.ids(Booting))
				}
			case "stop":
				booting := h.ids(Booting)
				if n := h.cloud.Count("launch"); n != 3 || h.cloud.Count("start") != 1 || len(booting) != 1 || !slices.Contains(reaped, booting[0]) {
					t.Fatalf("%d launch and %d start calls, booting %v; want a stopped one started", n, h.cloud.Count("start"), booting)
				}
				h.ready(booting[0])
				if h.state(booting[0]) != Idle {
					t.Fatalf("restarted instance is %s after ready, want idle", h.state(booting[0]))
				}
			}
		})
	}
}

// Reaping many idle instances at once makes one terminate call for all of
// them, not one each.
func TestReapedInstancesTerminatedInOneCall(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 8 })
	ids := h.warm(6)
	h.clock.Advance(h.opts.Pools["demo"].IdleTTD + time.Second)
	h.tick()
	h.settle()
	for _, id := range ids {
		if h.state(id) != Gone || !h.cloud.Terminated(id) {
			t.Errorf("%s: %s, terminated %v", id, h.state(id), h.cloud.Terminated(id))
		}
	}
	calls := h.cloud.Calls("terminate")
	if len(calls) != 1 || len(calls[0].IDs) != 6 {
		t.Errorf("terminate calls %+v, want one call with the 6 ids", calls)
	}
}
