package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/metrics"
	"github.com/hangar-ci/hangar/pool/store"
	"github.com/hangar-ci/hangar/userdata"
)

// harness runs one Manager over a fake cloud, a fake clock and a real store
// in t.TempDir(). Most tests drive it by hand (tick, reconcile, settle);
// those about start-up run Manager.Run and poll with eventually.
type harness struct {
	t     *testing.T
	clock *fakeClock
	cloud *fakeCloud
	opts  Options
	path  string
	store *store.Store
	m     *Manager
	// metrics, when set before open, are the Manager's.
	metrics *metrics.Metrics
	// quiet, when set before open, leaves the Manager's log out.
	quiet bool

	runCancel context.CancelFunc
	runDone   chan struct{}
}

// testOptions is one pool, "demo", on the fake cloud; mod adjusts the pool.
func testOptions(mod func(*Spec)) Options {
	spec := Spec{
		Provider:     "fake",
		MinIdle:      0,
		MaxInstances: 4,
		IdleTTD:      10 * time.Minute,
		BootTimeout:  5 * time.Minute,
		LeaseTTL:     time.Hour,
		MaxLeaseTTL:  24 * time.Hour,
		ClaimTimeout: 2 * time.Minute,
		Bootstrap:    "builtin:generic.sh",
		Launch: cloud.LaunchSpec{
			Image:              "img-1",
			InstanceTypes:      []string{"fake.small"},
			Spot:               "off",
			MetadataHTTPTokens: "required",
			MetadataHopLimit:   1,
		},
		UserData: userdata.Params{Format: userdata.FormatScript},
	}
	if mod != nil {
		mod(&spec)
	}
	return Options{
		Pools:     map[string]Spec{"demo": spec},
		PublicURL: "http://127.0.0.1:7878",
		// Only Run uses it; tests that drive the manager by hand call reconcile.
		ReconcileInterval: 5 * time.Millisecond,
		OrphanGrace:       5 * time.Minute,
	}
}

func newHarness(t *testing.T, mod func(*Spec)) *harness {
	t.Helper()
	clock := newFakeClock()
	h := &harness{
		t:     t,
		clock: clock,
		cloud: newFakeCloud(clock),
		opts:  testOptions(mod),
		path:  filepath.Join(t.TempDir(), "state.db"),
	}
	h.open()
	t.Cleanup(h.shutdown)
	return h
}

// open opens the store and a new Manager on it.
func (h *harness) open() {
	h.t.Helper()
	s, err := store.Open(h.path)
	if err != nil {
		h.t.Fatal(err)
	}
	h.store = s
	log := slog.New(slog.NewTextHandler(h.t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	if h.quiet {
		log = slog.New(slog.DiscardHandler)
	}
	o := h.opts
	o.Providers = map[string]cloud.Provider{"fake": h.cloud}
	o.Store, o.Logger, o.Clock, o.Tick, o.Metrics = s, log, h.clock, time.Millisecond, h.metrics
	m, err := New(o)
	if err != nil {
		s.Close()
		h.t.Fatal(err)
	}
	h.m = m
}

// shutdown stops the Manager and closes its store, as a server shutting
// down does; instances stay in the fake cloud.
func (h *harness) shutdown() {
	h.t.Helper()
	if h.m == nil {
		return
	}
	h.stopRun()
	if err := h.m.Close(); err != nil {
		h.t.Errorf("closing manager: %v", err)
	}
	if err := h.store.Close(); err != nil {
		h.t.Errorf("closing store: %v", err)
	}
	h.m, h.store = nil, nil
}

// restart is a server restart on the same store and cloud.
func (h *harness) restart() {
	h.t.Helper()
	h.shutdown()
	h.open()
}

// run starts Manager.Run; the harness stops it before closing.
func (h *harness) run() {
	ctx, cancel := context.WithCancel(context.Background())
	h.runCancel, h.runDone = cancel, make(chan struct{})
	go func() {
		defer close(h.runDone)
		h.m.Run(ctx)
	}()
}

func (h *harness) stopRun() {
	if h.runCancel != nil {
		h.runCancel()
		<-h.runDone
		h.runCancel, h.runDone = nil, nil
	}
}

// settle waits for every cloud call under way, and for those their results
// start, to finish. Only while Run is not running: nothing else may then
// start cloud calls.
func (h *harness) settle() {
	h.t.Helper()
	if h.runCancel != nil {
		h.t.Fatal("settle while Run runs")
	}
	h.m.wg.Wait()
}

// tick is one turn of Run's timer loop, then settle.
func (h *harness) tick() {
	h.t.Helper()
	h.m.mu.Lock()
	h.m.timersLocked()
	h.m.dispatchLocked()
	h.m.unlock()
	h.settle()
}

// reconcile is one of Run's reconciles, then settle.
func (h *harness) reconcile() {
	h.t.Helper()
	h.m.reconcile(context.Background())
	h.settle()
}

// eventually polls cond until it holds or a deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// lease asks for an instance without waiting for one.
func (h *harness) lease(r LeaseRequest) LeaseView {
	h.t.Helper()
	if r.Pool == "" {
		r.Pool = "demo"
	}
	v, err := h.m.Lease(context.Background(), Admin, r)
	if err != nil {
		h.t.Fatalf("lease: %v", err)
	}
	return v
}

func (h *harness) getLease(id string) LeaseView {
	h.t.Helper()
	v, err := h.m.GetLease(context.Background(), Admin, id, 0)
	if err != nil {
		h.t.Fatalf("get lease %s: %v", id, err)
	}
	return v
}

func (h *harness) release(id string, discard bool) {
	h.t.Helper()
	if err := h.m.Release(context.Background(), Admin, id, discard); err != nil {
		h.t.Fatalf("release %s: %v", id, err)
	}
}

// instance returns a copy of the pool's record of cloud instance id.
func (h *harness) instance(id string) Instance {
	h.t.Helper()
	h.m.mu.Lock()
	defer h.m.unlock()
	in, ok := h.m.byID[id]
	if !ok {
		h.t.Fatalf("the pool has no instance %s", id)
	}
	return *in
}

func (h *harness) state(id string) State { return h.instance(id).State }

// ids returns the cloud ids of the pool's instances in state s, sorted.
func (h *harness) ids(s State) []string {
	h.m.mu.Lock()
	defer h.m.unlock()
	var out []string
	for _, in := range h.m.instances {
		if in.State == s {
			out = append(out, in.ID)
		}
	}
	slices.Sort(out)
	return out
}

// only returns the one instance in state s.
func (h *harness) only(s State) string {
	h.t.Helper()
	got := h.ids(s)
	if len(got) != 1 {
		h.t.Fatalf("instances %s = %v, want exactly one", s, got)
	}
	return got[0]
}

// authenticate does what the instance's bootstrap does: it presents the
// token from its user-data.
func (h *harness) authenticate(id string) (string, error) {
	tok, err := h.cloud.BootstrapToken(id)
	if err != nil {
		return "", err
	}
	return h.m.Authenticate(bootstrap.HashToken(tok))
}

func (h *harness) key(id string) string {
	h.t.Helper()
	key, err := h.authenticate(id)
	if err != nil {
		h.t.Fatalf("instance %s authenticating with its user-data token: %v", id, err)
	}
	return key
}

// ready reports cloud instance id ready, as its bootstrap would.
func (h *harness) ready(id string) {
	h.t.Helper()
	if err := h.m.Ready(context.Background(), h.key(id), bootstrap.Ready{SSHHostKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake " + id}); err != nil {
		h.t.Fatalf("ready %s: %v", id, err)
	}
	h.settle()
}

// poll is one assignment poll of instance id.
func (h *harness) poll(id, current string, wait time.Duration) bootstrap.Assignment {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait+5*time.Second)
	defer cancel()
	a, err := h.m.Assignment(ctx, h.key(id), bootstrap.Poll{Current: current, Wait: wait})
	if err != nil {
		h.t.Fatalf("assignment %s: %v", id, err)
	}
	return a
}

// cleanRelease is the instance's side of a release: told its lease is over,
// it stops its worker and polls again with no current lease. It returns the
// answer to that poll.
func (h *harness) cleanRelease(id, leaseID string) bootstrap.Assignment {
	h.t.Helper()
	if a := h.poll(id, leaseID, 0); a.State != bootstrap.AssignReleased {
		h.t.Fatalf("instance %s polling with lease %s: assignment %q, want %q", id, leaseID, a.State, bootstrap.AssignReleased)
	}
	return h.poll(id, "", 0)
}

func (h *harness) pool() PoolView {
	h.t.Helper()
	for _, p := range h.m.Pools() {
		if p.Name == "demo" {
			return p
		}
	}
	h.t.Fatal("no pool demo")
	return PoolView{}
}

// warm launches n instances, reports them ready and returns their ids.
func (h *harness) warm(n int) []string {
	h.t.Helper()
	if _, err := h.m.Scale(context.Background(), "demo", &n, nil); err != nil {
		h.t.Fatal(err)
	}
	h.settle()
	booting := h.ids(Booting)
	if len(booting) != n {
		h.t.Fatalf("after scaling min_idle to %d: booting %v", n, booting)
	}
	for _, id := range booting {
		h.ready(id)
	}
	zero := 0
	if _, err := h.m.Scale(context.Background(), "demo", &zero, nil); err != nil {
		h.t.Fatal(err)
	}
	if got := h.ids(Idle); !slices.Equal(got, booting) {
		h.t.Fatalf("idle %v, want %v", got, booting)
	}
	return booting
}

// leaseOn leases and checks the lease went to an instance at once.
func (h *harness) leaseOn(r LeaseRequest) (LeaseView, string) {
	h.t.Helper()
	v := h.lease(r)
	if v.State != LeaseActive || v.Instance == nil {
		h.t.Fatalf("lease %s is %s, want active on an idle instance", v.ID, v.State)
	}
	return v, v.Instance.ID
}

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
			eventually(t, "the intent to be launched or adopted", func() bool { return len(h.ids(Booting)) == 1 })
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

// pendingLease asks for a lease and gives up waiting at once, as a client
// whose wait was cut would; wait still sets how long the lease is kept.
func (h *harness) pendingLease(r LeaseRequest) LeaseView {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r.Pool = "demo"
	v, err := h.m.Lease(ctx, Admin, r)
	if err != nil {
		h.t.Fatal(err)
	}
	if v.State != LeasePending {
		h.t.Fatalf("lease %s is %s, want pending", v.ID, v.State)
	}
	return v
}

// leaseState peeks at a lease without asking after it as a client would.
func (h *harness) leaseState(id string) LeaseState {
	h.m.mu.Lock()
	defer h.m.unlock()
	if l, ok := h.m.leases[id]; ok {
		return l.State
	}
	return ""
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
	eventually(t, "the first launches to be under way", func() bool {
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
