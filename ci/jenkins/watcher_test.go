package jenkins

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/ci/jenkins/jenkinstest"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
)

const (
	testUser  = "hangar"
	testToken = "0123456789abcdef0123456789abcdef01"
	testLabel = "hangar-linux"
	idleTTD   = 10 * time.Minute
)

type fixture struct {
	t       *testing.T
	srv     *jenkinstest.Server
	leaser  *fakeLeaser
	clock   *testutil.FakeClock
	watcher *Watcher
}

// newFixture runs a watcher for pool "ci" of at most max instances against
// a fresh test controller. The watcher is driven by hand, one Reconcile at
// a time, on a clock the test moves.
func newFixture(t *testing.T, max int) *fixture {
	t.Helper()
	srv := jenkinstest.New(jenkinstest.Options{User: testUser, Token: testToken})
	t.Cleanup(srv.Close)
	c := testutil.NewFakeClockAt(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	f := &fixture{t: t, srv: srv, clock: c, leaser: newFakeLeaser("ci", max, c.Now)}
	f.watcher = f.newWatcher(testToken)
	return f
}

func (f *fixture) newWatcher(token string) *Watcher {
	f.t.Helper()
	w, err := New(Options{
		Pool:     "ci",
		Jenkins:  Config{URL: f.srv.URL, User: testUser, Label: testLabel},
		IdleTTD:  idleTTD,
		LeaseTTL: time.Hour,
		Token:    token,
		Leaser:   f.leaser,
		Logger:   slog.New(slog.NewTextHandler(testWriter{f.t}, nil)),
		Clock:    f.clock,
	})
	if err != nil {
		f.t.Fatal(err)
	}
	return w
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func (f *fixture) reconcile() {
	f.t.Helper()
	if err := f.watcher.Reconcile(context.Background()); err != nil {
		f.t.Fatalf("reconcile: %v", err)
	}
}

func (f *fixture) nodeNames() []string {
	var names []string
	for _, n := range f.srv.Nodes() {
		names = append(names, n.Name)
	}
	return names
}

// connect runs node's agent, with the secret its lease carries.
func (f *fixture) connect(node string) *jenkinstest.Agent {
	f.t.Helper()
	l := f.leaser.lease(node)
	if l == nil {
		f.t.Fatalf("node %s has no lease", node)
	}
	a, _, err := f.srv.Connect(node, l.req.Worker.Password)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(a.Close)
	return a
}

// Builds waiting for the pool's label get one node each, up to
// max_instances; builds for other labels, or not waiting for a node, get
// none. Each node is an inbound WebSocket agent with one executor, and its
// lease carries the node's name and secret and the controller's URL.
func TestNodesForWaitingBuilds(t *testing.T) {
	f := newFixture(t, 3)
	f.srv.Enqueue("freestyle-1", testLabel, false)
	f.srv.Enqueue("other-label", "windows", false)
	f.srv.Enqueue("pipeline-1", testLabel, true)
	f.reconcile()
	nodes := f.srv.Nodes()
	if len(nodes) != 2 {
		t.Fatalf("nodes %v after 2 matching builds, want 2", f.nodeNames())
	}
	for _, n := range nodes {
		if !strings.HasPrefix(n.Name, "hangar-ci-") || len(n.Name) != len("hangar-ci-")+8 {
			t.Errorf("node name %q", n.Name)
		}
		if n.Launcher != "hudson.slaves.JNLPLauncher" || !n.WebSocket || n.Executors != 1 || n.Mode != "EXCLUSIVE" ||
			n.RemoteFS != DefaultRemoteFS || strings.Join(n.Labels, " ") != testLabel ||
			n.Retention != "hudson.slaves.RetentionStrategy$Always" || !strings.HasPrefix(n.Description, "Hangar pool ci:") {
			t.Errorf("node %+v", n)
		}
		l := f.leaser.lease(n.Name)
		if l == nil {
			t.Fatalf("node %s has no lease", n.Name)
		}
		want := pool.Worker{Name: n.Name, Password: f.srv.Secret(n.Name), Master: f.srv.URL}
		if l.req.Worker != want || l.req.Pool != "ci" || l.req.ClientToken != "jenkins:"+n.Name || l.req.Wait != 0 {
			t.Errorf("lease request %+v, want worker %+v", l.req, want)
		}
	}

	// Two more builds: one more node fits under max_instances = 3.
	f.srv.Enqueue("freestyle-2", testLabel, false)
	f.srv.Enqueue("freestyle-3", testLabel, false)
	f.reconcile()
	f.reconcile()
	if got := len(f.srv.Nodes()); got != 3 {
		t.Errorf("%d nodes for 4 builds with max_instances = 3, want 3", got)
	}
	if f.leaser.requests != 3 {
		t.Errorf("%d leases asked for, want 3", f.leaser.requests)
	}
}

func TestLabelMismatchIgnored(t *testing.T) {
	f := newFixture(t, 3)
	f.srv.Enqueue("a", "hangar-linux-arm", false)
	f.srv.Enqueue("b", "linux && hangar-linux", false)
	f.srv.Enqueue("c", "hangar", true)
	for range 3 {
		f.reconcile()
	}
	if n := f.nodeNames(); len(n) != 0 {
		t.Errorf("nodes %v for builds of other labels", n)
	}
}

// The whole life of a node: the build waits, the node's agent connects,
// the build runs and is never cut short however long it takes, then the
// node idles for idle_ttd and is deleted, and its instance goes back to the
// pool.
func TestIdleNodeDeletedBusyNodeKept(t *testing.T) {
	f := newFixture(t, 3)
	f.srv.Enqueue("long-build", testLabel, false)
	f.reconcile()
	names := f.nodeNames()
	if len(names) != 1 {
		t.Fatalf("nodes %v, want 1", names)
	}
	name := names[0]
	f.leaser.activate(name)
	f.reconcile()
	f.connect(name)
	if n, _ := f.srv.Node(name); n.Build != "long-build #1" {
		t.Fatalf("node %s runs %q, want the build", name, n.Build)
	}
	for range 5 {
		f.clock.Advance(idleTTD)
		f.reconcile()
	}
	if _, ok := f.srv.Node(name); !ok {
		t.Fatal("a node running a build was deleted")
	}
	if l := f.leaser.lease(name); l.view.State != pool.LeaseActive {
		t.Fatalf("lease of a busy node is %s", l.view.State)
	}
	if f.leaser.renewals == 0 {
		t.Error("the lease of a long build was never renewed")
	}

	f.srv.FinishBuild(name)
	f.reconcile() // idle from here
	f.clock.Advance(idleTTD - time.Second)
	f.reconcile()
	if _, ok := f.srv.Node(name); !ok {
		t.Fatal("node deleted before idle_ttd")
	}
	f.clock.Advance(time.Second)
	f.reconcile()
	if _, ok := f.srv.Node(name); ok {
		t.Fatal("node idle for idle_ttd not deleted")
	}
	if l := f.leaser.lease(name); l.view.State != pool.LeaseReleased || l.discard {
		t.Errorf("lease %s (discard %v), want released for reuse", l.view.State, l.discard)
	}
	if got := f.srv.Hits("POST /computer/" + name + "/changeOfflineCause"); got != 1 {
		t.Errorf("node taken offline %d times before its deletion, want 1", got)
	}
}

// Jenkins may hand an idle node a build in the moment before it is
// deleted: taking it offline first and reading it again catches that, and
// the node stays, back online.
func TestBuildJustBeforeDeletion(t *testing.T) {
	f := newFixture(t, 1)
	f.srv.Enqueue("first", testLabel, false)
	f.reconcile()
	name := f.nodeNames()[0]
	f.leaser.activate(name)
	f.connect(name)
	f.srv.FinishBuild(name)
	f.reconcile()
	f.srv.SetHooks(jenkinstest.Hooks{MarkedOffline: func(node string) { f.srv.StartBuild(node, "late") }})
	f.clock.Advance(idleTTD)
	f.reconcile()
	n, ok := f.srv.Node(name)
	if !ok {
		t.Fatal("node deleted with a build on it")
	}
	if n.TemporarilyOffline || n.Build != "late #1" {
		t.Errorf("node kept %+v, want it back online running the late build", n)
	}
	if l := f.leaser.lease(name); l.view.State != pool.LeaseActive {
		t.Errorf("lease %s, want still active", l.view.State)
	}

	f.srv.SetHooks(jenkinstest.Hooks{})
	f.srv.FinishBuild(name)
	f.reconcile()
	f.clock.Advance(idleTTD)
	f.reconcile()
	if _, ok := f.srv.Node(name); ok {
		t.Error("node not deleted once idle again")
	}
}

// A build cancelled while its node waits for an instance: the node goes,
// its pending lease is cancelled.
func TestCancelledBuildCancelsNode(t *testing.T) {
	f := newFixture(t, 3)
	id := f.srv.Enqueue("soon-cancelled", testLabel, false)
	f.reconcile()
	name := f.nodeNames()[0]
	f.srv.Cancel(id)
	f.reconcile()
	if _, ok := f.srv.Node(name); ok {
		t.Error("node kept for a cancelled build")
	}
	if l := f.leaser.lease(name); l.view.State != pool.LeaseCanceled {
		t.Errorf("lease %s, want canceled", l.view.State)
	}
}

// An instance whose agent never connects is given up: node deleted,
// instance discarded.
func TestAgentNeverConnects(t *testing.T) {
	f := newFixture(t, 3)
	f.srv.Enqueue("b", testLabel, false)
	f.reconcile()
	name := f.nodeNames()[0]
	f.leaser.activate(name)
	f.reconcile()
	f.clock.Advance(DefaultConnectTimeout)
	f.reconcile()
	if _, ok := f.srv.Node(name); ok {
		t.Fatal("node kept though its agent never connected")
	}
	if l := f.leaser.lease(name); l.view.State != pool.LeaseReleased || !l.discard {
		t.Errorf("lease %s (discard %v), want released and discarded", l.view.State, l.discard)
	}
	// The build still waits: a new node is made for it at once.
	if got := len(f.srv.Nodes()); got != 1 {
		t.Errorf("%d nodes after the broken one went, want a new one", got)
	}
}

// The pool lost the instance (or its lease ended some other way): the node
// is useless and goes; one deleted by hand gives its instance back.
func TestLeaseEndedOrNodeDeletedByHand(t *testing.T) {
	f := newFixture(t, 3)
	f.srv.Enqueue("a", testLabel, false)
	f.srv.Enqueue("b", testLabel, false)
	f.reconcile()
	names := f.nodeNames()
	for _, n := range names {
		f.leaser.activate(n)
	}
	f.leaser.setState(names[0], pool.LeaseLost)
	f.reconcile()
	if _, ok := f.srv.Node(names[0]); ok {
		t.Error("node whose lease was lost is kept")
	}

	var adminClient = &Client{URL: f.srv.URL, User: testUser, Token: testToken}
	if err := adminClient.DeleteNode(context.Background(), names[1]); err != nil {
		t.Fatal(err)
	}
	f.reconcile()
	if l := f.leaser.lease(names[1]); l.view.State != pool.LeaseReleased {
		t.Errorf("lease of a node deleted by hand is %s, want released", l.view.State)
	}
}

// A restarted watcher adopts the nodes of the one before, with their
// leases (found by client token), and creates none twice. Nodes that only
// look like its own are left alone.
func TestRestartAdopts(t *testing.T) {
	f := newFixture(t, 3)
	f.srv.AddNode(jenkinstest.Node{Name: "hangar-ci-byhand01", Description: "a human's node", Labels: []string{testLabel}})
	f.srv.AddNode(jenkinstest.Node{Name: "other-node", Description: "Hangar pool ci: but not its prefix", Labels: []string{testLabel}})
	a := f.srv.Enqueue("a", testLabel, false)
	b := f.srv.Enqueue("b", testLabel, false)
	f.reconcile()
	var ours []string
	for _, n := range f.watcher.Nodes() {
		ours = append(ours, n.Name)
	}
	if len(ours) != 2 {
		t.Fatalf("watcher holds %v, want 2 nodes", ours)
	}
	f.leaser.activate(ours[0])

	f.watcher = f.newWatcher(testToken)
	f.reconcile()
	got := f.watcher.Nodes()
	if len(got) != 2 || got[0].Name != ours[0] || got[1].Name != ours[1] {
		t.Fatalf("restarted watcher holds %v, want %v", got, ours)
	}
	if got[0].State != pool.LeaseActive || got[1].State != pool.LeasePending {
		t.Errorf("adopted leases %v, want active and pending", got)
	}
	if f.leaser.requests != 2 || len(f.srv.Nodes()) != 4 {
		t.Errorf("after restart: %d leases, nodes %v; want the same 2 leases and nodes", f.leaser.requests, f.nodeNames())
	}
	for _, name := range []string{"hangar-ci-byhand01", "other-node"} {
		if f.leaser.lease(name) != nil {
			t.Errorf("node %s, not ours, was leased for", name)
		}
	}
	// Nothing waits any more and time passes: only its own nodes go.
	f.srv.Cancel(a)
	f.srv.Cancel(b)
	f.connect(ours[0])
	f.reconcile()
	f.clock.Advance(idleTTD)
	f.reconcile()
	if names := f.nodeNames(); len(names) != 2 || names[0] != "hangar-ci-byhand01" || names[1] != "other-node" {
		t.Errorf("nodes left %v, want only the two that are not the pool's", names)
	}
}

func TestAuthFailureReported(t *testing.T) {
	f := newFixture(t, 1)
	w := f.newWatcher("wrong-token-value")
	err := w.Check(context.Background())
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("Check with a wrong token: %v, want ErrAuth", err)
	}
	want := `jenkins ` + f.srv.URL + ` for pool ci: checking the credentials: HTTP 401: user "hangar" or its API token was refused (Error 401 Invalid password/token for user: hangar)`
	if err.Error() != want {
		t.Errorf("error:\n%s\nwant:\n%s", err, want)
	}
	err = w.Reconcile(context.Background())
	if !errors.Is(err, ErrAuth) || strings.Contains(err.Error(), "wrong-token-value") {
		t.Errorf("Reconcile with a wrong token: %v", err)
	}
	if err := f.watcher.Check(context.Background()); err != nil {
		t.Errorf("Check with the right token: %v", err)
	}
}

func TestNewRefusesBadOptions(t *testing.T) {
	j := Config{URL: "http://127.0.0.1:1/", User: "u", Label: "l"}
	l := newFakeLeaser("ci", 1, time.Now)
	tests := []struct {
		name string
		o    Options
		want string
	}{
		{"no pool", Options{Jenkins: j, IdleTTD: 1, LeaseTTL: 1, Token: "t", Leaser: l}, "no pool"},
		{"no leaser", Options{Pool: "ci", Jenkins: j, IdleTTD: 1, LeaseTTL: 1, Token: "t"}, "no pool manager"},
		{"no jenkins", Options{Pool: "ci", IdleTTD: 1, LeaseTTL: 1, Token: "t", Leaser: l}, "URL, a user and a label are required"},
		{"no label", Options{Pool: "ci", Jenkins: Config{URL: j.URL, User: "u"}, IdleTTD: 1, LeaseTTL: 1, Token: "t", Leaser: l}, "a label are required"},
		{"negative poll", Options{Pool: "ci", Jenkins: Config{URL: j.URL, User: "u", Label: "l", PollInterval: -1}, IdleTTD: 1, LeaseTTL: 1, Token: "t", Leaser: l}, "must not be negative"},
		{"no token", Options{Pool: "ci", Jenkins: j, IdleTTD: 1, LeaseTTL: 1, Leaser: l}, "no API token"},
		{"no idle_ttd", Options{Pool: "ci", Jenkins: j, LeaseTTL: 1, Token: "t", Leaser: l}, "must be positive"},
	}
	for _, tt := range tests {
		if _, err := New(tt.o); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.want)
		}
	}
}
