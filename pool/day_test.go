package pool

import (
	"context"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/metrics"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
)

// TestADayOfPoolLife runs 24 hours of a pool on the fake clock, minute by
// minute, as Run would (timers and dispatch every minute, reconcile every
// five): a working day of builds, each taking a few minutes, then a quiet
// night; an abandoned lease that expires; an instance that never boots.
// Every fact of it follows from the clock, so the day ends the same way on
// every run, in a fraction of a second of wall time.
func TestADayOfPoolLife(t *testing.T) {
	h := newHarness(t, func(p *Spec) {
		p.MinIdle = 1
		p.MaxInstances = 3
		p.IdleTTD = 15 * time.Minute
		p.LeaseTTL = time.Hour
	})
	h.shutdown()
	h.quiet = true // a day's log is long
	h.metrics = metrics.New(prometheus.NewRegistry(), func() metrics.Snapshot { return metrics.Snapshot{} })
	h.open()
	wall := time.Now()
	ctx := context.Background()
	start := h.clock.Now()

	type build struct {
		id, instance string
		until        time.Time
	}
	var running []build
	neverBoots := ""
	leased, abandoned := 0, ""
	var abandonedEnded LeaseState
	for minute := 0; minute < 24*60; minute++ {
		now := h.clock.Now()
		hour := now.Sub(start).Hours()
		// Instances boot within a minute, but for one that never does.
		for _, id := range h.ids(Booting) {
			if neverBoots == "" && minute > 600 {
				neverBoots = id
			}
			if id != neverBoots {
				h.ready(id)
			}
		}
		// Released instances stop their worker and come back.
		for _, id := range h.ids(Releasing) {
			in := h.instance(id)
			a, _ := h.m.Assignment(ctx, in.Key, bootstrap.Poll{Current: "gone"})
			if a.State == bootstrap.AssignReleased {
				if _, err := h.m.Assignment(ctx, in.Key, bootstrap.Poll{}); err != nil {
					t.Fatalf("minute %d: poll of released %s: %v", minute, id, err)
				}
			}
		}
		// Working hours, 8 to 18: a build every 7 minutes, 20 minutes each.
		if hour >= 8 && hour < 18 && minute%7 == 0 {
			v := h.lease(LeaseRequest{})
			leased++
			if v.State == LeaseActive {
				if abandoned == "" && hour >= 12 {
					abandoned = v.ID // its holder vanishes: never released
				} else {
					running = append(running, build{v.ID, v.Instance.ID, now.Add(20 * time.Minute)})
				}
			}
		}
		var still []build
		for _, b := range running {
			if now.Before(b.until) {
				still = append(still, b)
				continue
			}
			h.release(b.id, false)
		}
		running = still
		// Pending leases are asked after, as their clients would.
		h.m.mu.Lock()
		var pending []string
		for _, l := range h.m.leases {
			if l.State == LeasePending && l.ID != abandoned {
				pending = append(pending, l.ID)
			}
		}
		h.m.unlock()
		for _, id := range pending {
			if v := h.getLease(id); v.State == LeaseActive {
				running = append(running, build{id, v.Instance.ID, now.Add(20 * time.Minute)})
			}
		}
		if abandoned != "" {
			if st := h.leaseState(abandoned); st != "" && st != LeaseActive {
				abandonedEnded = st
			}
		}
		h.clock.Advance(time.Minute)
		h.tick()
		if minute%5 == 0 {
			h.reconcile()
		}
		if live := len(h.cloud.Running()); live > 3 {
			t.Fatalf("minute %d: %d instances running, max_instances is 3", minute, live)
		}
	}

	if abandonedEnded != LeaseExpired {
		t.Errorf("the abandoned lease ended %q, want expired", abandonedEnded)
	}
	reaped := func(reason string) float64 {
		return promtest.ToFloat64(h.metrics.Reaped.WithLabelValues("demo", reason))
	}
	if n := reaped("lease_expired"); n != 1 {
		t.Errorf("reaped for lease_expired: %v, want 1 (its machine's state is unknown)", n)
	}
	if n := reaped("boot_timeout"); n != 1 {
		t.Errorf("reaped for boot_timeout: %v, want 1", n)
	}
	if n := reaped("idle_ttd"); n < 1 {
		t.Errorf("reaped for idle_ttd: %v, want the day's extra instances reaped by night", n)
	}
	// By night the pool is down to its warm spare.
	if idle, all := len(h.ids(Idle)), len(h.cloud.Running()); idle != 1 || all != 1 {
		t.Errorf("at the end of the day: %d idle, %d running; want the one min_idle spare", idle, all)
	}
	if n := promtest.ToFloat64(h.metrics.IllegalTransitions.WithLabelValues("instance")); n != 0 {
		t.Errorf("%v illegal transitions", n)
	}
	t.Logf("a day of pool life: %d leases asked, %d launches, %v reaped for idle_ttd, in %s of wall time",
		leased, h.cloud.Count("launch"), reaped("idle_ttd"), time.Since(wall).Round(time.Millisecond))
}

// TestRunFollowsTheClock: Run's timer loop ticks on the pool's clock, not
// the wall's: with an hour between ticks, the fake clock's hour is what
// reaps an idle instance.
func TestRunFollowsTheClock(t *testing.T) {
	h := newHarness(t, nil)
	id := h.warm(1)[0]
	h.m.tick = time.Hour
	h.run()
	testutil.Eventually(t, "Run's tickers", 10*time.Second, func() bool { return h.clock.Waiters() >= 2 })
	h.clock.Advance(59 * time.Minute)
	time.Sleep(20 * time.Millisecond) // room for a wrong tick to do harm
	if st := h.state(id); st != Idle {
		t.Fatalf("instance is %s before the hour's tick, want idle", st)
	}
	h.clock.Advance(time.Minute)
	testutil.Eventually(t, "the idle instance reaped at the hour's tick", 10*time.Second, func() bool {
		st := h.state(id)
		return st == Terminating || st == Gone
	})
}
