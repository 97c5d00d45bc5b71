// Package jenkins gives a Jenkins controller inbound agents on a pool's
// instances. A Watcher polls the controller's build queue through its REST
// API; for builds waiting for the pool's label it creates inbound nodes and
// leases an instance for each from the pool manager (worker name = node
// name, password = the node's secret, master = the controller's URL, which
// the agent that the pool's bootstrap, scripts/bootstrap/jenkins-agent.sh,
// runs connects to). A node idle for the pool's idle_ttd is deleted and its
// instance released; a node running a build never is. The package knows
// nothing of Hangar's TOML: cmd/hangar builds a Config from the pool's
// [pools.NAME.jenkins] table, and a Watcher uses the pool manager only
// through Leaser (ManagerLeaser).
//
// What it relies on of Jenkins's REST API (core 2.x; jenkinstest mirrors it):
//
//	GET  crumbIssuer/api/json        CSRF crumb for POSTs (404: CSRF protection off)
//	GET  me/api/json                 who the credentials are: the start-up check
//	GET  queue/api/json?tree=…       items: id, why, buildable, pending, task[labelExpression]
//	GET  computer/api/json?tree=…    nodes: displayName, description, offline,
//	GET  computer/NAME/api/json          temporarilyOffline, idle
//	POST computer/doCreateItem       name, type=hudson.slaves.DumbSlave, json={… JNLPLauncher …}
//	GET  computer/NAME/jenkins-agent.jnlp   the secret: the first <argument>
//	                                 (slave-agent.jnlp on older controllers)
//	POST computer/NAME/changeOfflineCause   temporarily offline: no new builds
//	POST computer/NAME/toggleOffline        back online
//	POST computer/NAME/doDelete
//
// A queued item's label is read from its why, which for a buildable item
// waiting for a label is one of Jenkins's messages "There are no nodes with
// the label ‘L’", "All nodes of label ‘L’ are offline" or "Waiting for next
// available executor on ‘L’" (asked for in English with Accept-Language):
// that is the only place a Pipeline node('L') step's label shows. When the
// why names none (a controller forced into another language), the task's
// labelExpression, which freestyle (AbstractProject) jobs export, is used.
// Only buildable items that no executor has taken yet count, and only an
// exact match of the pool's label: label expressions ("linux && docker")
// are not evaluated.
//
// The watcher keeps no state of its own. Its nodes are those whose name
// starts with the pool's node_prefix and whose description names the pool;
// each node's lease has the client token "jenkins:NODE", so a restarted
// watcher finds the lease of every node it adopts by asking for it again.
package jenkins

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/internal/clock"
	"github.com/hangar-ci/hangar/pool"
)

// Leaser is what a Watcher needs of the pool manager: ManagerLeaser has it.
type Leaser interface {
	Lease(ctx context.Context, r pool.LeaseRequest) (pool.LeaseView, error)
	GetLease(ctx context.Context, id string, wait time.Duration) (pool.LeaseView, error)
	Renew(ctx context.Context, id string) (pool.LeaseView, error)
	Release(ctx context.Context, id string, discard bool) error
	Pools() []pool.PoolView
}

// Owner owns the leases watchers make. API token names cannot contain ':',
// so no API caller can act on them as their owner.
var Owner = pool.Caller{Name: "hangar:jenkins"}

// ManagerLeaser is the pool manager as a watcher uses it: every lease is
// made and handled as Owner.
type ManagerLeaser struct{ M *pool.Manager }

var _ Leaser = ManagerLeaser{}

func (l ManagerLeaser) Lease(ctx context.Context, r pool.LeaseRequest) (pool.LeaseView, error) {
	return l.M.Lease(ctx, Owner, r)
}

func (l ManagerLeaser) GetLease(ctx context.Context, id string, wait time.Duration) (pool.LeaseView, error) {
	return l.M.GetLease(ctx, Owner, id, wait)
}

func (l ManagerLeaser) Renew(ctx context.Context, id string) (pool.LeaseView, error) {
	return l.M.Renew(ctx, Owner, id)
}

func (l ManagerLeaser) Release(ctx context.Context, id string, discard bool) error {
	return l.M.Release(ctx, Owner, id, discard)
}

func (l ManagerLeaser) Pools() []pool.PoolView { return l.M.Pools() }

// Config is what a Watcher needs of one pool's [pools.NAME.jenkins] table;
// cmd/hangar builds it from the TOML. Zero optional values take the
// defaults below, which are those of the TOML table.
type Config struct {
	// URL is the controller's root URL, as its agents reach it too.
	URL  string
	User string
	// Label is the one Jenkins label the pool serves.
	Label string
	// NodePrefix starts the name of every node of the pool; "" is
	// "hangar-POOL-".
	NodePrefix string
	// RemoteFS is the nodes' root directory on the instance; "" is
	// DefaultRemoteFS.
	RemoteFS string
	// PollInterval is how often the queue and the nodes are read; 0 is
	// DefaultPollInterval.
	PollInterval time.Duration
	// ConnectTimeout is how long a node whose instance is leased may stay
	// disconnected before the instance is thought broken and discarded; 0
	// is DefaultConnectTimeout.
	ConnectTimeout time.Duration
}

// Defaults of Config, the same as the TOML table's.
const (
	DefaultRemoteFS       = "/var/lib/jenkins-agent"
	DefaultPollInterval   = 10 * time.Second
	DefaultConnectTimeout = 5 * time.Minute
)

// WithDefaults fills what c leaves empty for the pool named pool, and ends
// URL with a slash so that endpoints resolve below it.
func (c Config) WithDefaults(pool string) Config {
	if c.URL != "" && !strings.HasSuffix(c.URL, "/") {
		c.URL += "/"
	}
	if c.NodePrefix == "" {
		c.NodePrefix = "hangar-" + pool + "-"
	}
	if c.RemoteFS == "" {
		c.RemoteFS = DefaultRemoteFS
	}
	if c.PollInterval == 0 {
		c.PollInterval = DefaultPollInterval
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	return c
}

// Options configure a Watcher.
type Options struct {
	Pool    string
	Jenkins Config // New fills in its defaults
	// IdleTTD is how long a node may be idle before it is deleted: the
	// pool's idle_ttd.
	IdleTTD time.Duration
	// LeaseTTL is the pool's lease_ttl; leases are renewed when a third of
	// it has passed.
	LeaseTTL time.Duration
	Token    string // the user's API token
	Leaser   Leaser
	Logger   *slog.Logger
	HTTP     *http.Client // nil: a default client
	Clock    clock.Clock  // nil: clock.Real
}

// Watcher runs one pool's Jenkins nodes.
type Watcher struct {
	pool     string
	cfg      Config
	idleTTD  time.Duration
	leaseTTL time.Duration
	client   *Client
	leaser   Leaser
	log      *slog.Logger
	clock    clock.Clock
	marker   string // how the description of every node of this pool starts

	nodes   map[string]*node
	lastErr string
}

// node is the watcher's view of one of its nodes.
type node struct {
	name  string
	lease string          // "" until leased
	state pool.LeaseState // of the lease
	// idleSince: first seen connected (or paused) with nothing running;
	// zero otherwise.
	idleSince time.Time
	// downSince: first seen disconnected while its lease is active.
	downSince time.Time
}

// New checks o and returns a watcher; Run starts it.
func New(o Options) (*Watcher, error) {
	switch {
	case o.Pool == "":
		return nil, errors.New("jenkins watcher: no pool")
	case o.Leaser == nil:
		return nil, errors.New("jenkins watcher: no pool manager")
	case o.Jenkins.URL == "" || o.Jenkins.User == "" || o.Jenkins.Label == "":
		return nil, fmt.Errorf("jenkins watcher: pool %s: the controller's URL, a user and a label are required", o.Pool)
	case o.Jenkins.PollInterval < 0 || o.Jenkins.ConnectTimeout < 0:
		return nil, fmt.Errorf("jenkins watcher: pool %s: poll_interval and connect_timeout must not be negative", o.Pool)
	case o.IdleTTD <= 0 || o.LeaseTTL <= 0:
		return nil, fmt.Errorf("jenkins watcher: pool %s: idle_ttd and lease_ttl must be positive", o.Pool)
	case o.Token == "":
		return nil, fmt.Errorf("jenkins watcher: pool %s: no API token", o.Pool)
	}
	cfg := o.Jenkins.WithDefaults(o.Pool)
	w := &Watcher{
		pool:     o.Pool,
		cfg:      cfg,
		idleTTD:  o.IdleTTD,
		leaseTTL: o.LeaseTTL,
		client:   &Client{URL: cfg.URL, User: cfg.User, Token: o.Token, HTTP: o.HTTP},
		leaser:   o.Leaser,
		log:      o.Logger,
		clock:    o.Clock,
		marker:   "Hangar pool " + o.Pool + ":",
		nodes:    map[string]*node{},
	}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	w.log = w.log.With("pool", o.Pool, "jenkins", cfg.URL)
	if w.clock == nil {
		w.clock = clock.Real
	}
	return w, nil
}

// Check makes sure the controller answers and accepts the credentials.
func (w *Watcher) Check(ctx context.Context) error {
	id, err := w.client.Whoami(ctx)
	if err != nil {
		return fmt.Errorf("jenkins %s for pool %s: %w", w.cfg.URL, w.pool, err)
	}
	w.log.Info("jenkins controller reachable", "user", id, "label", w.cfg.Label)
	return nil
}

// Run reconciles at once and every poll interval until ctx ends. Errors are
// logged, each new one at error level, and retried at the next poll.
func (w *Watcher) Run(ctx context.Context) {
	tick := w.clock.NewTicker(w.cfg.PollInterval)
	defer tick.Stop()
	for {
		err := w.Reconcile(ctx)
		if ctx.Err() != nil {
			return
		}
		w.report(err)
		select {
		case <-ctx.Done():
			return
		case <-tick.C():
		}
	}
}

func (w *Watcher) report(err error) {
	switch {
	case err == nil && w.lastErr != "":
		w.log.Info("jenkins watcher recovered")
		w.lastErr = ""
	case err == nil:
	case err.Error() != w.lastErr:
		w.lastErr = err.Error()
		w.log.Error("jenkins watcher", "err", err)
	default:
		w.log.Debug("jenkins watcher: same error again", "err", err)
	}
}

// Reconcile reads the queue and the nodes once and acts on them: leases for
// nodes without one, deletions of nodes no longer needed, new nodes for
// builds still waiting.
func (w *Watcher) Reconcile(ctx context.Context) error {
	// The computers before the queue: a build that starts on one of our
	// nodes between the two reads then leaves the queue after its node was
	// seen idle (one node too many counted as free, which creates nothing),
	// not before it was seen busy with the build still queued (which made
	// a node for a build that had one).
	all, err := w.client.Computers(ctx)
	if err != nil {
		return fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
	}
	items, err := w.client.Queue(ctx)
	if err != nil {
		return fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
	}
	now := w.clock.Now()
	ours := map[string]Computer{}
	for _, c := range all {
		if strings.HasPrefix(c.DisplayName, w.cfg.NodePrefix) && strings.HasPrefix(c.Description, w.marker) {
			ours[c.DisplayName] = c
		}
	}
	var errs []error
	for _, name := range sortedKeys(w.nodes) {
		if _, ok := ours[name]; ok {
			continue
		}
		n := w.nodes[name]
		w.log.Info("node deleted outside Hangar; releasing its instance", "node", name, "lease", n.lease)
		if err := w.release(ctx, n, false); err != nil {
			errs = append(errs, err)
			continue // retried next time
		}
		delete(w.nodes, name)
	}
	for name := range ours {
		if _, ok := w.nodes[name]; !ok {
			// Left by an earlier run: its lease, if any, is found again by
			// its client token.
			w.log.Info("adopting node", "node", name)
			w.nodes[name] = &node{name: name}
		}
	}
	for _, name := range sortedKeys(w.nodes) {
		if err := w.keepLease(ctx, w.nodes[name]); err != nil {
			errs = append(errs, err)
		}
		w.observe(w.nodes[name], ours[name], now)
	}

	demand := 0
	for _, it := range items {
		if it.Buildable && !it.Pending && it.Label() == w.cfg.Label {
			demand++
		}
	}

	// Nodes no longer needed. Whatever runs a build is left alone.
	for _, name := range sortedKeys(w.nodes) {
		n, c := w.nodes[name], ours[name]
		if !c.Idle {
			continue
		}
		var reason string
		discard := false
		switch {
		case n.state != "" && n.state != pool.LeasePending && n.state != pool.LeaseActive:
			reason = "its lease ended (" + string(n.state) + ")"
		case !n.downSince.IsZero() && now.Sub(n.downSince) >= w.cfg.ConnectTimeout:
			reason = fmt.Sprintf("its agent has not been connected for %s", w.cfg.ConnectTimeout)
			discard = true // the instance did not run the agent: broken
		case !n.idleSince.IsZero() && now.Sub(n.idleSince) >= w.idleTTD:
			reason = fmt.Sprintf("idle for %s", w.idleTTD)
		default:
			continue
		}
		if _, err := w.retire(ctx, n, c, reason, discard); err != nil {
			errs = append(errs, err)
		}
	}

	// Nodes still waiting for an instance while fewer builds wait than
	// nodes could take them: the builds were cancelled or went elsewhere.
	available := 0
	var unstarted []*node
	for _, name := range sortedKeys(w.nodes) {
		if c := ours[name]; c.Idle {
			available++
			if n := w.nodes[name]; n.state == "" || n.state == pool.LeasePending {
				unstarted = append(unstarted, n)
			}
		}
	}
	for _, n := range unstarted {
		if available <= demand {
			break
		}
		retired, err := w.retire(ctx, n, ours[n.name], "no build waits for it", false)
		if err != nil {
			errs = append(errs, err)
		}
		if retired {
			available--
		}
	}

	// New nodes for builds no node can take, up to max_instances.
	room := w.maxInstances() - len(w.nodes)
	for need := demand - available; need > 0 && room > 0; need, room = need-1, room-1 {
		if err := w.create(ctx); err != nil {
			errs = append(errs, err)
			break
		}
	}
	return errors.Join(errs...)
}

func (w *Watcher) maxInstances() int {
	for _, p := range w.leaser.Pools() {
		if p.Name == w.pool {
			return p.MaxInstances
		}
	}
	return 0
}

// observe updates n's timers from its computer's state.
func (w *Watcher) observe(n *node, c Computer, now time.Time) {
	switch {
	case !c.Idle: // running a build
		n.idleSince, n.downSince = time.Time{}, time.Time{}
	case !c.Offline || c.TemporarilyOffline:
		// Connected, or paused by someone (perhaps a retire cut short):
		// either way it runs nothing.
		n.downSince = time.Time{}
		if n.idleSince.IsZero() {
			n.idleSince = now
		}
	default: // disconnected
		n.idleSince = time.Time{}
		switch {
		case n.state != pool.LeaseActive:
			n.downSince = time.Time{}
		case n.downSince.IsZero():
			n.downSince = now
		}
	}
}

// clientToken makes leasing a node's instance idempotent, across restarts.
func clientToken(node string) string { return "jenkins:" + node }

// keepLease gets n a lease if it has none, keeps a pending one from being
// given up, renews an active one, and notes its state.
func (w *Watcher) keepLease(ctx context.Context, n *node) error {
	if n.lease == "" {
		secret, err := w.client.Secret(ctx, n.name)
		if err != nil {
			return fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
		}
		v, err := w.leaser.Lease(ctx, pool.LeaseRequest{
			Pool:        w.pool,
			Worker:      pool.Worker{Name: n.name, Password: secret, Master: w.cfg.URL},
			Labels:      map[string]string{"jenkins-node": n.name},
			ClientToken: clientToken(n.name),
		})
		if err != nil {
			return fmt.Errorf("leasing an instance for node %s: %w", n.name, err)
		}
		n.lease, n.state = v.ID, v.State
		w.log.Info("leased for node", "node", n.name, "lease", v.ID, "state", v.State)
		return nil
	}
	if n.state != pool.LeasePending && n.state != pool.LeaseActive {
		return nil
	}
	// Asking keeps a pending lease queued.
	v, err := w.leaser.GetLease(ctx, n.lease, 0)
	if errors.Is(err, pool.ErrUnknownLease) {
		n.state = pool.LeaseLost
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading lease %s of node %s: %w", n.lease, n.name, err)
	}
	if v.State != n.state {
		w.log.Info("lease of node changed", "node", n.name, "lease", n.lease, "state", v.State)
	}
	n.state = v.State
	if v.State == pool.LeaseActive && v.ExpiresAt.Sub(w.clock.Now()) < w.leaseTTL*2/3 {
		v, err := w.leaser.Renew(ctx, n.lease)
		switch {
		case errors.Is(err, pool.ErrLeaseEnded):
			// Ended in between; the next read tells how.
		case err != nil:
			return fmt.Errorf("renewing lease %s of node %s: %w", n.lease, n.name, err)
		default:
			n.state = v.State
		}
	}
	return nil
}

// retire deletes node n and releases its lease, unless a build has started
// on it: the node is first taken temporarily offline, which stops Jenkins
// from giving it a build, and then read again. It reports whether the node
// is gone.
func (w *Watcher) retire(ctx context.Context, n *node, c Computer, reason string, discard bool) (bool, error) {
	paused := false
	if !c.TemporarilyOffline {
		err := w.client.MarkOffline(ctx, n.name, "Hangar: "+reason+"; deleting this node")
		switch {
		case errors.Is(err, ErrNotFound):
			return w.forget(ctx, n, discard)
		case err != nil:
			return false, fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
		}
		paused = true
	}
	now, err := w.client.Computer(ctx, n.name)
	switch {
	case errors.Is(err, ErrNotFound):
		return w.forget(ctx, n, discard)
	case err != nil:
		// Still paused: the next round sees it paused and idle and tries
		// again.
		return false, fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
	}
	if !now.Idle {
		w.log.Info("node took a build just before it was to be deleted; keeping it", "node", n.name)
		n.idleSince, n.downSince = time.Time{}, time.Time{}
		if paused && now.TemporarilyOffline {
			if err := w.client.ToggleOffline(ctx, n.name); err != nil {
				return false, fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
			}
		}
		return false, nil
	}
	// The lease goes first: should this stop half-way, the next round (or
	// the next run) finds the node with its lease ended and deletes it.
	if err := w.release(ctx, n, discard); err != nil {
		return false, err
	}
	if err := w.client.DeleteNode(ctx, n.name); err != nil && !errors.Is(err, ErrNotFound) {
		return false, fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
	}
	delete(w.nodes, n.name)
	w.log.Info("deleted node", "node", n.name, "lease", n.lease, "reason", reason, "discard", discard)
	return true, nil
}

// forget handles a node that vanished while being retired.
func (w *Watcher) forget(ctx context.Context, n *node, discard bool) (bool, error) {
	if err := w.release(ctx, n, discard); err != nil {
		return false, err
	}
	delete(w.nodes, n.name)
	w.log.Info("node already gone", "node", n.name, "lease", n.lease)
	return true, nil
}

// release ends n's lease, if it has a live one.
func (w *Watcher) release(ctx context.Context, n *node, discard bool) error {
	if n.lease == "" || n.state != pool.LeasePending && n.state != pool.LeaseActive {
		return nil
	}
	if err := w.leaser.Release(ctx, n.lease, discard); err != nil && !errors.Is(err, pool.ErrUnknownLease) {
		return fmt.Errorf("releasing lease %s of node %s: %w", n.lease, n.name, err)
	}
	n.state = pool.LeaseReleased
	return nil
}

// create adds one inbound node and leases an instance for it.
func (w *Watcher) create(ctx context.Context) error {
	name := w.cfg.NodePrefix + randomSuffix()
	err := w.client.CreateNode(ctx, NodeSpec{
		Name:        name,
		Description: w.marker + " inbound agent on a leased instance; Hangar deletes it when idle",
		Label:       w.cfg.Label,
		RemoteFS:    w.cfg.RemoteFS,
		Executors:   1,
		Exclusive:   true,
	})
	if err != nil {
		return fmt.Errorf("jenkins %s: %w", w.cfg.URL, err)
	}
	n := &node{name: name}
	w.nodes[name] = n
	w.log.Info("created node", "node", name, "label", w.cfg.Label)
	// Nothing ran on it yet and nothing can before its agent connects.
	return w.keepLease(ctx, n)
}

// randomSuffix is 8 characters a node name can have and Jenkins never
// escapes.
func randomSuffix() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// NodeStatus is what Nodes reports of one node.
type NodeStatus struct {
	Name  string
	Lease string
	State pool.LeaseState
}

// Nodes lists the nodes the watcher holds. Not safe to call while Run
// runs: for tests and Reconcile's callers.
func (w *Watcher) Nodes() []NodeStatus {
	var out []NodeStatus
	for _, name := range sortedKeys(w.nodes) {
		n := w.nodes[name]
		out = append(out, NodeStatus{Name: n.name, Lease: n.lease, State: n.state})
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
