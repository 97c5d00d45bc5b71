package pool

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
)

func TestOrphansTerminatedOnlyAfterGrace(t *testing.T) {
	h := newHarness(t, nil)
	known := h.warm(1)[0]
	owner := h.store.Owner()
	tagged := func(owner, pool, intent string) map[string]string {
		return map[string]string{cloud.TagOwner: owner, cloud.TagPool: pool, cloud.TagIntent: intent}
	}
	cases := []struct {
		name   string
		tags   map[string]string
		state  cloud.State
		reaped bool
	}{
		{"ours, unknown intent", tagged(owner, "demo", "h-unknown"), cloud.StateRunning, true},
		{"ours, stopped, unknown intent", tagged(owner, "demo", "h-unknown-2"), cloud.StateStopped, true},
		{"ours, pool not configured", tagged(owner, "old-pool", "h-unknown-3"), cloud.StateRunning, true},
		{"ours, no intent tag", map[string]string{cloud.TagOwner: owner, cloud.TagPool: "demo"}, cloud.StateRunning, true},
		{"another owner", tagged("hangar-0123456789abcdef", "demo", "h-theirs"), cloud.StateRunning, false},
		{"another owner, same intent as ours", tagged("hangar-0123456789abcdef", "demo", "h-unknown"), cloud.StateRunning, false},
		{"no tags", nil, cloud.StateRunning, false},
		{"ours, already terminated", tagged(owner, "demo", "h-dead"), cloud.StateTerminated, false},
	}
	ids := make([]string, len(cases))
	for i, c := range cases {
		ids[i] = h.cloud.Add(c.tags, c.state)
	}
	check := func(when string, grace bool) {
		t.Helper()
		for i, c := range cases {
			want := c.reaped && grace
			if got := h.cloud.Terminated(ids[i]); got != want {
				t.Errorf("%s: %s (%s) terminated = %v, want %v", when, c.name, ids[i], got, want)
			}
		}
	}

	grace := h.opts.OrphanGrace
	h.reconcile()
	check("first seen", false)
	for _, step := range []time.Duration{time.Minute, time.Minute, grace - 2*time.Minute - time.Second} {
		h.clock.Advance(step)
		h.reconcile()
	}
	check("a second before orphan_grace", false)
	h.clock.Advance(time.Second)
	h.reconcile()
	check("at orphan_grace", true)
	for range 3 {
		h.clock.Advance(time.Hour)
		h.reconcile()
	}
	check("long after", true)
	// The pool's own instance is untouched by all this, and the orphans
	// never become the pool's.
	if h.cloud.Terminated(known) || h.state(known) != Idle {
		t.Errorf("known instance %s: terminated %v, state %s; want idle", known, h.cloud.Terminated(known), h.state(known))
	}
	if got := h.pool().Instances; len(got) != 1 || got[Idle] != 1 {
		t.Errorf("pool instances = %v, want only the known idle one", got)
	}
}

// An instance the cloud lists before the launch call that made it returns is
// not an orphan nor a duplicate: its launch answer names it.
func TestReconcileSparesInstanceWhoseLaunchIsUnderWay(t *testing.T) {
	h := newHarness(t, nil)
	entered, proceed := make(chan struct{}), make(chan struct{})
	h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		close(entered)
		select {
		case <-proceed:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	v := h.lease(LeaseRequest{})
	<-entered
	listed := h.cloud.Running()
	if len(listed) != 1 {
		t.Fatalf("cloud runs %v, want one instance", listed)
	}
	id := listed[0]
	for range 3 {
		// Not settle: the launch call is held.
		h.m.reconcile(context.Background())
		h.clock.Advance(h.opts.OrphanGrace + time.Second)
	}
	h.cloud.SetAfterLaunch(nil)
	close(proceed)
	h.settle()
	h.reconcile()
	if h.cloud.Terminated(id) {
		t.Fatalf("instance %s was terminated while its launch was under way", id)
	}
	if got := h.state(id); got != Booting {
		t.Fatalf("instance %s is %s, want %s", id, got, Booting)
	}
	h.ready(id)
	if got := h.getLease(v.ID); got.State != LeaseActive || got.Instance.ID != id {
		t.Fatalf("lease %+v, want active on %s", got, id)
	}
}

// A cloud that ignored the client token and started a second instance for
// one intent: the pool keeps the first and ends the other, without waiting
// out orphan_grace, and never the first.
func TestReconcileEndsSecondInstanceOfOneIntent(t *testing.T) {
	h := newHarness(t, nil)
	first := h.warm(1)[0]
	key := h.instance(first).Key
	second := h.cloud.Add(map[string]string{cloud.TagOwner: h.store.Owner(), cloud.TagPool: "demo", cloud.TagIntent: key}, cloud.StateRunning)
	h.reconcile()
	h.reconcile()
	if !h.cloud.Terminated(second) {
		t.Fatalf("second instance %s of intent %s was not terminated", second, key)
	}
	for range 3 {
		h.clock.Advance(h.opts.OrphanGrace)
		h.reconcile()
	}
	if h.cloud.Terminated(first) || h.state(first) != Idle {
		t.Fatalf("first instance %s: terminated %v, state %s; want it kept idle", first, h.cloud.Terminated(first), h.state(first))
	}
}

// A crash after the launch intent is on disk and before the launch's answer
// is: the next start must end with exactly one instance for the intent,
// launched with the intent's key as client token, and serving the lease.
func TestRestartResumesInterruptedLaunch(t *testing.T) {
	cases := []struct {
		name string
		// reached: the cloud got the launch before the crash.
		reached bool
		// hidden: the listing at the restart does not show it yet.
		hidden bool
		// again: a second crash cuts the retry off before the cloud.
		again bool
	}{
		{name: "cloud never got it"},
		{name: "cloud never got it, retry cut off", again: true},
		{name: "cloud launched it", reached: true},
		{name: "cloud launched it, listing lags", reached: true, hidden: true},
		{name: "cloud launched it, listing lags, retry cut off", reached: true, hidden: true, again: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t, nil)
			// hold holds launch calls until the server goes down.
			hold := func() (<-chan struct{}, func(context.Context, cloud.LaunchSpec) error) {
				entered := make(chan struct{})
				var once sync.Once
				return entered, func(ctx context.Context, spec cloud.LaunchSpec) error {
					once.Do(func() { close(entered) })
					<-ctx.Done()
					return ctx.Err()
				}
			}
			entered, held := hold()
			if c.reached {
				h.cloud.SetAfterLaunch(held)
			} else {
				h.cloud.SetBeforeLaunch(held)
			}
			v := h.lease(LeaseRequest{ClientToken: "build-1"})
			<-entered
			h.m.mu.Lock()
			var key string
			for k, in := range h.m.instances {
				if in.State != Launching {
					t.Errorf("instance %s is %s, want %s", k, in.State, Launching)
				}
				key = k
			}
			h.m.unlock()
			h.shutdown()
			h.cloud.SetBeforeLaunch(nil)
			h.cloud.SetAfterLaunch(nil)
			before := h.cloud.Running()
			if c.reached != (len(before) == 1) {
				t.Fatalf("cloud runs %v before the restart", before)
			}
			for _, id := range before {
				h.cloud.Hide(id, c.hidden)
			}

			h.open()
			if c.again {
				entered, held := hold()
				h.cloud.SetBeforeLaunch(held)
				h.run()
				<-entered
				h.shutdown()
				h.cloud.SetBeforeLaunch(nil)
				h.open()
			}
			h.m.mu.Lock()
			restored := h.m.instances[key]
			h.m.unlock()
			if restored == nil || restored.State != Launching {
				t.Fatalf("restored intent %s = %+v, want a launching record", key, restored)
			}
			h.run()
			testutil.Eventually(t, "the intent to be launched or adopted", 10*time.Second, func() bool { return len(h.ids(Booting)) == 1 })
			h.stopRun()
			for _, id := range before {
				h.cloud.Hide(id, false)
			}

			after := h.cloud.Running()
			if len(after) != 1 {
				t.Fatalf("cloud runs %v after the restart, want one instance", after)
			}
			id := after[0]
			if c.reached && id != before[0] {
				t.Fatalf("cloud runs %s, want the one launched before the crash, %s", id, before[0])
			}
			if got := h.instance(id); got.Key != key {
				t.Fatalf("instance %s has key %s, want the intent's %s", id, got.Key, key)
			}
			// The first call, one for each cut-off retry, and one that
			// worked; none when the listing showed the instance.
			wantCalls := 2
			if c.again {
				wantCalls++
			}
			if c.reached && !c.hidden {
				wantCalls = 1
			}
			if n := h.cloud.Count("launch"); n != wantCalls {
				t.Errorf("launch calls = %d, want %d", n, wantCalls)
			}
			for i, call := range h.cloud.Calls("launch") {
				if call.ClientToken != key {
					t.Errorf("launch call %d used client token %q, want the intent key %q", i, call.ClientToken, key)
				}
			}
			if inst, _ := h.cloud.Instance(id); inst.Tags[cloud.TagIntent] != key || inst.Tags[cloud.TagOwner] != h.store.Owner() {
				t.Errorf("instance %s tags %v, want intent %s and owner %s", id, inst.Tags, key, h.store.Owner())
			}
			// The instance boots with whatever token its user-data holds;
			// it must be accepted.
			h.ready(id)
			got := h.getLease(v.ID)
			if got.State != LeaseActive || got.Instance == nil || got.Instance.ID != id {
				t.Fatalf("lease after restart = %+v, want active on %s", got, id)
			}
			if a := h.poll(id, "", 0); a.State != bootstrap.AssignAssigned || a.LeaseID != v.ID {
				t.Fatalf("assignment = %+v, want the lease %s", a, v.ID)
			}
			if again := h.lease(LeaseRequest{ClientToken: "build-1"}); again.ID != v.ID {
				t.Fatalf("lease with the same client token after restart = %s, want %s", again.ID, v.ID)
			}
		})
	}
}

func TestLostInstanceEndsLeaseAndIsReplaced(t *testing.T) {
	cases := []struct {
		name string
		lose func(h *harness, id string)
		// grace: the loss is only believed after listGrace.
		grace bool
	}{
		{"listed terminated", func(h *harness, id string) { h.cloud.SetState(id, cloud.StateTerminated) }, false},
		{"listed shutting down", func(h *harness, id string) { h.cloud.SetState(id, cloud.StateTerminating) }, false},
		{"vanished from the listing", func(h *harness, id string) { h.cloud.Remove(id) }, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t, func(p *Spec) { p.MinIdle, p.MaxInstances = 1, 1 })
			h.tick()
			id := h.only(Booting)
			h.ready(id)
			v, _ := h.leaseOn(LeaseRequest{})
			h.tick()
			if n := h.cloud.Count("launch"); n != 1 {
				t.Fatalf("launch calls = %d, want 1 (max_instances)", n)
			}
			key := h.key(id)

			c.lose(h, id)
			if c.grace {
				h.clock.Advance(listGrace - time.Second)
				h.reconcile()
				if got := h.getLease(v.ID); got.State != LeaseActive {
					t.Fatalf("lease %s is %s within the listing grace, want active", v.ID, got.State)
				}
				h.clock.Advance(2 * time.Second)
			}
			h.reconcile()
			if got := h.getLease(v.ID); got.State != LeaseLost {
				t.Fatalf("lease %s is %s, want %s", v.ID, got.State, LeaseLost)
			}
			if got := h.state(id); got != Gone {
				t.Fatalf("lost instance is %s, want %s", got, Gone)
			}
			if a, _ := h.m.Assignment(context.Background(), key, bootstrap.Poll{Current: v.ID}); a.State != bootstrap.AssignTerminate {
				t.Fatalf("lost instance's assignment = %q, want %q", a.State, bootstrap.AssignTerminate)
			}
			if _, err := h.m.Renew(context.Background(), Admin, v.ID); !errors.Is(err, ErrLeaseEnded) {
				t.Fatalf("renew of a lost lease: %v, want ErrLeaseEnded", err)
			}
			replacement := h.only(Booting)
			if replacement == id || h.cloud.Count("launch") != 2 {
				t.Fatalf("replacement %s after %d launches, want a new instance", replacement, h.cloud.Count("launch"))
			}
		})
	}
}

func TestRestartRestoresLeasesAndInstances(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 2 })
	ids := h.warm(2)
	a, onA := h.leaseOn(LeaseRequest{ClientToken: "a", Labels: map[string]string{"job": "a"}})
	b, onB := h.leaseOn(LeaseRequest{Worker: Worker{Name: "worker-b", Master: "ci.example:9989"}})
	var pending []LeaseView
	for _, tok := range []string{"c", "d", "e"} {
		h.clock.Advance(time.Second)
		pending = append(pending, h.pendingLease(LeaseRequest{ClientToken: tok}))
	}
	one := 1
	if _, err := h.m.Scale(context.Background(), "demo", &one, nil); err != nil {
		t.Fatal(err)
	}
	h.settle()
	snapshot := map[string]Instance{}
	for _, id := range ids {
		snapshot[id] = h.instance(id)
	}

	h.restart()

	if p := h.pool(); p.MinIdle != 1 || p.MaxInstances != 2 || p.LeasesActive != 2 || p.LeasesPending != 3 {
		t.Fatalf("pool after restart: %+v; want min_idle 1 (scaled), max 2, 2 active and 3 pending leases", p)
	}
	for _, id := range ids {
		got, want := h.instance(id), snapshot[id]
		if got.Key != want.Key || got.State != Leased || got.LeaseID != want.LeaseID || got.TokenHash != want.TokenHash ||
			got.Password != want.Password || got.Uses != 1 || got.SSHHostKey != want.SSHHostKey || got.PrivateIP != want.PrivateIP {
			t.Errorf("instance %s after restart = %+v, want %+v", id, got, want)
		}
	}
	for _, l := range []struct {
		v  LeaseView
		on string
	}{{a, onA}, {b, onB}} {
		got := h.getLease(l.v.ID)
		if got.State != LeaseActive || got.Instance == nil || got.Instance.ID != l.on || got.Worker != l.v.Worker || !got.ExpiresAt.Equal(l.v.ExpiresAt) {
			t.Errorf("lease %s after restart = %+v, want %+v", l.v.ID, got, l.v)
		}
	}
	if got := h.getLease(a.ID); got.Labels["job"] != "a" {
		t.Errorf("labels after restart %v", got.Labels)
	}
	h.m.mu.Lock()
	var queue []string
	for _, l := range h.m.pools["demo"].queue {
		queue = append(queue, l.ID)
	}
	h.m.unlock()
	if want := []string{pending[0].ID, pending[1].ID, pending[2].ID}; !slices.Equal(queue, want) {
		t.Fatalf("queue after restart %v, want %v", queue, want)
	}
	if got := h.lease(LeaseRequest{ClientToken: "d"}); got.ID != pending[1].ID {
		t.Fatalf("client token after restart: lease %s, want %s", got.ID, pending[1].ID)
	}

	// The restored state works: reconcile keeps it, workers go on, and
	// released instances serve the queue in order.
	h.reconcile()
	if a := h.poll(onA, a.ID, 0); a.State != bootstrap.AssignNone {
		t.Fatalf("worker of a restored lease told %q, want none", a.State)
	}
	h.release(a.ID, false)
	h.cleanRelease(onA, a.ID)
	h.release(b.ID, false)
	h.cleanRelease(onB, b.ID)
	for i, want := range []string{onA, onB} {
		if got := h.getLease(pending[i].ID); got.State != LeaseActive || got.Instance.ID != want {
			t.Fatalf("restored pending lease %d = %+v, want active on %s", i, got, want)
		}
		if a := h.poll(want, "", 0); a.State != bootstrap.AssignAssigned || a.LeaseID != pending[i].ID {
			t.Fatalf("instance %s assigned %+v, want lease %s", want, a, pending[i].ID)
		}
	}
	if got := h.getLease(pending[2].ID); got.State != LeasePending {
		t.Fatalf("third restored pending lease is %s, want pending", got.State)
	}
	if n := h.cloud.Count("launch"); n != 2 {
		t.Fatalf("launch calls = %d, want 2: nothing relaunched", n)
	}
}

// An instance can report ready before the launch call that started it has
// returned; the launch's answer then makes it idle at once.
func TestReadyBeforeLaunchAnswer(t *testing.T) {
	h := newHarness(t, nil)
	h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
		tok, err := h.cloud.BootstrapToken(h.cloud.Launched(spec.ClientToken)[0])
		if err != nil {
			return err
		}
		key, err := h.m.Authenticate(bootstrap.HashToken(tok))
		if err != nil {
			return err
		}
		return h.m.Ready(ctx, key, bootstrap.Ready{})
	})
	v := h.lease(LeaseRequest{})
	h.settle()
	if got := h.cloud.Calls("launch"); len(got) != 1 || got[0].Err != nil {
		t.Fatalf("launch calls %+v", got)
	}
	id := h.cloud.Running()[0]
	if got := h.getLease(v.ID); got.State != LeaseActive || got.Instance.ID != id || h.state(id) != Leased {
		t.Fatalf("lease %+v, instance %s; want the lease active on %s", got, h.state(id), id)
	}
}
