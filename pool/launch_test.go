package pool

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
)

func TestQuotaErrorBlocksLaunchesUntilScale(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MinIdle = 1 })
	h.cloud.FailAll("launch", cloud.ErrQuota)
	h.tick()
	if n := h.cloud.Count("launch"); n != 1 {
		t.Fatalf("launch calls = %d, want 1", n)
	}
	p := h.pool()
	if !p.LaunchBlocked || !strings.Contains(p.LaunchError, cloud.ErrQuota.Error()) {
		t.Fatalf("pool after a quota error: blocked %v, error %q; want blocked with the quota error", p.LaunchBlocked, p.LaunchError)
	}
	// Neither time within reason nor demand makes it launch again.
	v := h.lease(LeaseRequest{})
	h.settle()
	for range 100 {
		h.clock.Advance(time.Second)
		h.tick()
	}
	if n := h.cloud.Count("launch"); n != 1 {
		t.Fatalf("launch calls after 100 ticks while blocked = %d, want 1", n)
	}
	if got := h.getLease(v.ID); got.State != LeasePending {
		t.Fatalf("lease %s is %s, want pending", v.ID, got.State)
	}

	// An operator raised the quota and says so with a scale.
	h.cloud.FailAll("launch", nil)
	if _, err := h.m.Scale(context.Background(), "demo", nil, nil); err != nil {
		t.Fatal(err)
	}
	h.settle()
	if p := h.pool(); p.LaunchBlocked || p.LaunchError != "" {
		t.Fatalf("pool after scale: blocked %v, error %q; want neither", p.LaunchBlocked, p.LaunchError)
	}
	booting := h.ids(Booting)
	if len(booting) != 2 || h.cloud.Count("launch") != 3 {
		t.Fatalf("after scale: booting %v, %d launch calls; want 2 and 3 (the lease and min_idle)", booting, h.cloud.Count("launch"))
	}
}

func TestQuotaBlockIsRetriedRarely(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MinIdle = 1 })
	h.cloud.FailAll("launch", cloud.ErrQuota)
	h.tick()
	for range 4 * 60 {
		h.clock.Advance(time.Second)
		h.tick()
	}
	if n := h.cloud.Count("launch"); n != 1 {
		t.Fatalf("launch calls in 4 minutes = %d, want 1", n)
	}
	h.clock.Advance(2 * time.Minute)
	h.tick()
	h.tick()
	if n := h.cloud.Count("launch"); n != 2 {
		t.Fatalf("launch calls after 6 minutes = %d, want 2", n)
	}
	if !h.pool().LaunchBlocked {
		t.Fatal("pool not blocked after its second quota error")
	}
}

func TestCapacityErrorBacksOff(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MinIdle = 1 })
	h.cloud.FailNext("launch", fmt.Errorf("no t3.small in us-east-1a: %w", cloud.ErrCapacity))
	h.tick()
	p := h.pool()
	if n := h.cloud.Count("launch"); n != 1 || p.LaunchBlocked || p.RetryAt == nil || !strings.Contains(p.LaunchError, "insufficient capacity") {
		t.Fatalf("after a capacity error: %d launch calls, pool %+v; want 1 call, not blocked, an error and a retry time", n, p)
	}
	retryAt := *p.RetryAt
	if d := retryAt.Sub(h.clock.Now()); d < time.Second || d > 2*time.Second {
		t.Fatalf("first backoff %s, want between 1s and 2s", d)
	}
	for h.clock.Now().Add(100 * time.Millisecond).Before(retryAt) {
		h.clock.Advance(100 * time.Millisecond)
		h.tick()
	}
	if n := h.cloud.Count("launch"); n != 1 {
		t.Fatalf("launch calls before retry time = %d, want 1", n)
	}
	h.clock.Advance(100 * time.Millisecond)
	h.tick()
	if n := h.cloud.Count("launch"); n != 2 {
		t.Fatalf("launch calls after retry time = %d, want 2", n)
	}
	if p := h.pool(); p.LaunchError != "" || p.RetryAt != nil || len(h.ids(Booting)) != 1 {
		t.Fatalf("after a successful retry: pool %+v, booting %v", p, h.ids(Booting))
	}
}

func TestCapacityBackoffGrows(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MinIdle = 1 })
	h.cloud.FailAll("launch", cloud.ErrCapacity)
	h.tick()
	for i := 1; i <= 9; i++ {
		if n := h.cloud.Count("launch"); n != i {
			t.Fatalf("launch calls = %d, want %d", n, i)
		}
		retryAt := h.pool().RetryAt
		if retryAt == nil {
			t.Fatalf("no retry time after %d capacity errors", i)
		}
		d := retryAt.Sub(h.clock.Now())
		hi := time.Second << min(i, 8)
		if d < hi/2 || d > hi {
			t.Fatalf("backoff after %d failures %s, want between %s and %s", i, d, hi/2, hi)
		}
		h.clock.Advance(d - time.Millisecond)
		h.tick()
		if n := h.cloud.Count("launch"); n != i {
			t.Fatalf("launch calls just before retry %d = %d, want %d", i, n, i)
		}
		h.clock.Advance(time.Millisecond)
		h.tick()
	}
	if p := h.pool(); p.LaunchBlocked {
		t.Fatal("capacity errors blocked the pool; only quota errors do")
	}
}

func TestBootTimeout(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 1 })
	v := h.pendingLease(LeaseRequest{Wait: 10 * time.Minute})
	h.settle()
	id := h.only(Booting)
	key := h.key(id)
	timeout := h.opts.Pools["demo"].BootTimeout
	h.clock.Advance(timeout)
	h.tick()
	if h.state(id) != Booting {
		t.Fatalf("instance at exactly boot_timeout is %s, want booting", h.state(id))
	}
	h.clock.Advance(time.Second)
	h.tick()
	if got := h.instance(id); got.State != Gone || got.Reason != "boot_timeout" || !h.cloud.Terminated(id) {
		t.Fatalf("instance past boot_timeout: %s (%s), terminated %v; want gone for boot_timeout", got.State, got.Reason, h.cloud.Terminated(id))
	}
	// Its token is dead: a late ready report is refused.
	if err := h.m.Ready(context.Background(), key, bootstrap.Ready{}); !errors.Is(err, bootstrap.ErrUnauthorized) {
		t.Fatalf("ready after boot timeout: %v, want ErrUnauthorized", err)
	}
	// The lease still waits, on a new instance.
	replacement := h.only(Booting)
	if replacement == id {
		t.Fatal("no replacement launched")
	}
	h.ready(replacement)
	if got := h.getLease(v.ID); got.State != LeaseActive || got.Instance.ID != replacement {
		t.Fatalf("lease = %+v, want active on %s", got, replacement)
	}
}

// A large scale-out keeps at most maxLaunching launch calls under way; each
// one that returns lets the next go.
func TestScaleOutBoundsLaunchesUnderWay(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 25 })
	var mu sync.Mutex
	inFlight, peak := 0, 0
	release := make(chan struct{})
	h.cloud.SetBeforeLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		mu.Lock()
		inFlight++
		peak = max(peak, inFlight)
		mu.Unlock()
		<-release
		mu.Lock()
		inFlight--
		mu.Unlock()
		return nil
	})
	n := 25
	if _, err := h.m.Scale(context.Background(), "demo", &n, nil); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the first launches to be under way", 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return inFlight == maxLaunching
	})
	close(release)
	h.settle()
	if got := len(h.cloud.Running()); got != 25 {
		t.Errorf("%d instances launched, want 25", got)
	}
	if peak > maxLaunching {
		t.Errorf("%d launches under way at once, want at most %d", peak, maxLaunching)
	}
}
