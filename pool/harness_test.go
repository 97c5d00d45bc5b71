package pool

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
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
	// logs, when set before open, also gets the Manager's log.
	logs io.Writer
	// provider, when set before open, is the pool's provider in place of
	// the fake cloud (a wrapper of it).
	provider cloud.Provider

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
	out := h.t.Output()
	if h.logs != nil {
		out = io.MultiWriter(out, h.logs)
	}
	log := slog.New(slog.NewTextHandler(out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if h.quiet {
		log = slog.New(slog.DiscardHandler)
	}
	o := h.opts
	o.Providers = map[string]cloud.Provider{"fake": h.cloud}
	if h.provider != nil {
		o.Providers["fake"] = h.provider
	}
	o.Store, o.Logger, o.Clock, o.Tick, o.Metrics = s, log, h.clock, time.Millisecond, h.metrics
	m, err := New(o)
	if err != nil {
		_ = s.Close()
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
