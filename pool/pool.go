package pool

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/clock"
	"github.com/hangar-ci/hangar/metrics"
	"github.com/hangar-ci/hangar/pool/store"
)

// Clock is the pool's one source of time: its timers, tickers and long
// polls all follow it, so that a test with a fake clock runs a day of pool
// life in a moment.
type Clock = clock.Clock

// Errors the API maps to status codes.
var (
	ErrUnknownPool     = errors.New("unknown pool")
	ErrUnknownLease    = errors.New("unknown lease")
	ErrUnknownInstance = errors.New("unknown instance")
	ErrInvalid         = errors.New("invalid request")
	ErrLeaseEnded      = errors.New("lease has ended")
)

// Options configure a Manager.
type Options struct {
	// Pools are the pools to run, by name.
	Pools map[string]Spec
	// PublicURL is how instances reach the bootstrap endpoints.
	PublicURL string
	// ReconcileInterval is how often the clouds are listed.
	ReconcileInterval time.Duration
	// OrphanGrace is how long an instance tagged as ours but unknown to
	// the store lives before it is terminated.
	OrphanGrace time.Duration
	Providers   map[string]cloud.Provider // by Spec.Provider
	Store       *store.Store
	Logger      *slog.Logger
	Metrics     *metrics.Metrics // nil: no metrics
	Clock       Clock            // nil: clock.Real
	// Tick is how often timers (TTD, boot timeout, lease expiry) are checked
	// against Clock. Default 1s.
	Tick time.Duration
	// Images copies images between regions for pools whose image is in
	// another (Spec.ImageFrom); required when there are such pools.
	Images ImageCopier
	// Simulation, when set, is for a simulation or a hand-driven test
	// (sim_hooks.go), never a server.
	Simulation *Simulation
}

// Instance is the pool's record of one instance. Key is ours from the moment
// the launch intent is written; ID is the cloud's, known once launched.
type Instance struct {
	Key        string    `json:"key"`
	ID         string    `json:"id,omitempty"`
	Pool       string    `json:"pool"`
	State      State     `json:"state"`
	Since      time.Time `json:"since"`
	Reason     Reason    `json:"reason,omitempty"`
	PrivateIP  string    `json:"private_ip,omitempty"`
	Type       string    `json:"type,omitempty"`
	Zone       string    `json:"zone,omitempty"`
	Image      string    `json:"image,omitempty"` // what it was launched from
	TokenHash  string    `json:"token_hash"`
	Password   string    `json:"password"`
	SSHHostKey string    `json:"ssh_host_key,omitempty"`
	Uses       int       `json:"uses"`
	LeaseID    string    `json:"lease_id,omitempty"`
	IntentAt   time.Time `json:"intent_at"`
	LaunchedAt time.Time `json:"launched_at,omitempty"`
	ReadyAt    time.Time `json:"ready_at,omitempty"`
	LastSeen   time.Time `json:"last_seen,omitempty"`

	// EarlierTokenHashes are the hashes of the tokens of launches a restart
	// cut off. Such a launch may have reached the cloud; the retry with the
	// same client token then returns that instance, booted with the earlier
	// token, which must still let it in.
	EarlierTokenHashes []string `json:"earlier_token_hashes,omitempty"`
	// TokenRotated: the token in the instance's user-data has been
	// replaced (see rotateTokenLocked).
	TokenRotated bool `json:"token_rotated,omitempty"`
	// NextTokenHash is the hash of a token sent to the instance that it has
	// not used yet. Both work until it does; from its first call with the
	// new one, the old one is refused.
	NextTokenHash string `json:"next_token_hash,omitempty"`

	// CacheVolume is the id of the instance's cache volume once created
	// (its creation is idempotent by the instance's key, so a crash before
	// this is saved makes no second one); CacheAttached, once attached.
	CacheVolume   string `json:"cache_volume,omitempty"`
	CacheAttached bool   `json:"cache_attached,omitempty"`

	// Batch is the key of the batch it was launched in, and Slot its place
	// there (batch.go); "" for an instance launched on its own. A slot has
	// no token until it enrolls: EnrolledAt is then set, EnrollKeyHash is
	// the hash of the key it enrolled with, and TokenUsed says whether
	// the token issued has been presented since (an answer lost before
	// that may be issued again, to the same key only).
	Batch         string    `json:"batch,omitempty"`
	Slot          int       `json:"slot,omitempty"`
	EnrolledAt    time.Time `json:"enrolled_at,omitzero"`
	EnrollKeyHash string    `json:"enroll_key_hash,omitempty"`
	TokenUsed     bool      `json:"token_used,omitempty"`

	accounted time.Time     // instance-seconds accounted up to here
	op        Op            // the cloud call under way for it, if any
	refresh   *cacheRefresh // a snapshot of its cache asked while it is idle (cache.go)
	// cacheSnapUses is Uses when its cache was last snapshotted: a refresh
	// skips an instance that has served no lease since.
	cacheSnapUses int
	token         string        // the bootstrap token, kept only until launch
	wake          chan struct{} // closed to wake its assignment poll (wakeInstance)
}

func (in *Instance) name() string {
	if in.ID != "" {
		return in.ID
	}
	return in.Key
}

// LogValue keeps secrets out of logs even if a record is logged whole.
func (in *Instance) LogValue() slog.Value {
	return slog.GroupValue(slog.String("id", in.name()), slog.String("pool", in.Pool), slog.String("state", string(in.State)))
}

type poolState struct {
	name     string
	spec     Spec
	provider cloud.Provider
	queue    []*Lease // pending leases, FIFO
	// config is min_idle and max_instances as the config file has them;
	// scaled, that spec's come from `hangar scale` instead (kept in the
	// store, outliving restarts until `hangar scale --reset`).
	config PoolLimits
	scaled bool

	// launchCalls are its batches' launch calls under way or about to be
	// (batch.go); dispatch keeps them under maxLaunchCalls.
	launchCalls    int
	launchFailures int
	retryAt        time.Time // no launches before this
	launchErr      string    // last launch error, shown in hangar pools
	blocked        bool      // a quota error stopped launches
	cacheSavedAt   time.Time // the last snapshot of its cache (or the start): the refresh clock
	bakedImage     string    // its newest baked image (or its image's copy), launched from when set (bake.go)
	bakedAt        time.Time // when bakedImage was looked up
	// An image from another region (Spec.ImageFrom): the source image of
	// bakedImage, and the copy under way.
	imageSrc     string
	copying      bool
	copyStatus   string
	copyFailures int
	copyRetryAt  time.Time
	// count is its instances by state and idle its idle ones by key,
	// kept by index, setState and the forgetting of gone ones, so that a
	// dispatch need not walk every instance (dispatchPool).
	count map[State]int
	idle  map[string]*Instance
	// reconciledAt is when reconcile last applied a listing of its cloud:
	// an operator's alert tells a stalled reconcile by it.
	reconciledAt time.Time
	// auto sizes its spares when Spec.Autoscale is set (autoscaler.go).
	auto *autoscaler
}

// Manager runs every pool.
type Manager struct {
	opts    Options
	store   *store.Store
	log     *slog.Logger
	metrics *metrics.Metrics
	clock   Clock
	tick    time.Duration
	scripts bootstrap.Scripts

	mu        sync.Mutex
	pools     map[string]*poolState
	poolNames []string             // sorted: pools are visited in this order, the same on every run
	instances map[string]*Instance // by Key
	byID      map[string]*Instance // by cloud id
	byToken   map[string]*Instance // by bootstrap token hash
	// batches are the launches of several instances in one call, by key;
	// byBatchToken the live ones by the hashes of their enrollment tokens.
	batches      map[string]*Batch
	byBatchToken map[string]*Batch
	leases       map[string]*Lease
	byClient     map[string]*Lease // by clientKey
	// orphans and halting remember, per cloud id, since when reconcile has
	// seen an instance unknown to the store, or one the cloud says is
	// terminating; entries go when a listing no longer shows it so.
	orphans map[string]seenSince
	halting map[string]seenSince
	// strayVolumes: since when a cache volume of no known instance has
	// been seen (sweepCacheVolumes).
	strayVolumes map[string]time.Time
	// terminating queues instances per provider for terminateBatches.
	terminating map[cloud.Provider][]*Instance
	changed     chan struct{} // closed and replaced on every change
	restoredAt  time.Time     // when this process read the store
	// panicOnIllegal makes an illegal transition panic: under go test.
	panicOnIllegal bool
	ops            []store.Op // writes of the decision under way (see unlock)
	lastSave       *store.Commit
	wg             sync.WaitGroup
	ctx            context.Context
	cancel         context.CancelFunc

	// runs holds the output of the latest run of each active lease that
	// has one, in memory only (see run.go).
	runs      map[string]*runOutput
	maxOutput int

	events eventRing // the last pool events, for GET /v1/events (events.go)

	// Under a Simulation (sim_hooks.go): cloud calls queued for Settle,
	// where ids come from, and how long ended records are kept.
	deferredMu sync.Mutex
	deferred   []func(context.Context)
	ids        io.Reader
	endedKept  time.Duration
}

// New restores the pools' state from the store. Call Run to start work.
func New(opts Options) (*Manager, error) {
	m := &Manager{
		opts:         opts,
		store:        opts.Store,
		log:          opts.Logger,
		metrics:      opts.Metrics,
		clock:        opts.Clock,
		tick:         opts.Tick,
		scripts:      bootstrap.Scripts{CacheFor: time.Minute, Clock: opts.Clock},
		pools:        map[string]*poolState{},
		instances:    map[string]*Instance{},
		byID:         map[string]*Instance{},
		byToken:      map[string]*Instance{},
		batches:      map[string]*Batch{},
		byBatchToken: map[string]*Batch{},
		leases:       map[string]*Lease{},
		byClient:     map[string]*Lease{},
		orphans:      map[string]seenSince{},
		strayVolumes: map[string]time.Time{},
		halting:      map[string]seenSince{},
		terminating:  map[cloud.Provider][]*Instance{},
		changed:      make(chan struct{}),
		runs:         map[string]*runOutput{},
		maxOutput:    MaxOutput,
		endedKept:    endedKept,

		panicOnIllegal: testing.Testing(),
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if m.clock == nil {
		m.clock = clock.Real
	}
	if m.tick <= 0 {
		m.tick = time.Second
	}
	if sim := opts.Simulation; sim != nil {
		m.ids, m.endedKept = sim.IDs, sim.EndedKept
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	overrides, err := store.Load[scale](m.store, store.Pools)
	if err != nil {
		return nil, err
	}
	histories, err := store.Load[*demand](m.store, store.Demand)
	if err != nil {
		return nil, err
	}
	for name, spec := range opts.Pools {
		p, ok := opts.Providers[spec.Provider]
		if !ok {
			return nil, fmt.Errorf("pool %s: provider %q is not running", name, spec.Provider)
		}
		config := PoolLimits{MinIdle: spec.MinIdle, MaxInstances: spec.MaxInstances}
		o, scaled := overrides[name]
		if scaled {
			spec.MinIdle, spec.MaxInstances = o.MinIdle, o.MaxInstances
			// Said at every start: otherwise an edited config that
			// changes nothing is a mystery.
			m.log.Warn("pool limits scaled at run time override the config; `hangar scale "+name+" --reset` drops them",
				"pool", name, "min_idle", o.MinIdle, "max_instances", o.MaxInstances,
				"config_min_idle", config.MinIdle, "config_max_instances", config.MaxInstances)
		}
		if spec.ImageFrom != nil && opts.Images == nil {
			return nil, fmt.Errorf("pool %s: its image is in another region, and nothing copies images", name)
		}
		if _, ok := cloud.StorageOf(p); spec.Cache != nil && !ok {
			return nil, fmt.Errorf("pool %s: a cache needs volumes, and provider %q has none", name, spec.Provider)
		}
		if spec.Identity == "signed" && (spec.SignedIdentity == nil || spec.SignedIdentity.Verifier == nil) {
			return nil, fmt.Errorf("pool %s: signed identity needs a certificate to check documents with", name)
		}
		// Render once now so that a pool whose user-data can never be
		// rendered fails at start, not at its first launch.
		if _, err := spec.userData(name, opts.PublicURL, "probe-token"); err != nil {
			return nil, fmt.Errorf("pool %s: %w", name, err)
		}
		ps := &poolState{name: name, spec: spec, provider: p, config: config, scaled: scaled, cacheSavedAt: m.clock.Now(),
			count: map[State]int{}, idle: map[string]*Instance{}}
		if spec.Autoscale != nil {
			ps.auto = newAutoscaler(*spec.Autoscale, histories[name], m.clock.Now())
		}
		m.pools[name] = ps
	}
	m.poolNames = slices.Sorted(maps.Keys(m.pools))
	if err := m.restore(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	for _, p := range m.pools {
		// A restarted pool warms up from its history at once.
		m.autoscaleLocked(p, m.clock.Now())
	}
	// A removed pool's history goes with it. (A pool set back to a fixed
	// min_idle keeps its own: its counts age out, and a return to auto
	// starts from what is left.)
	for name := range histories {
		if m.pools[name] == nil {
			m.write(store.Op{Kind: store.Demand, ID: name})
		}
	}
	repairs := m.synced()
	m.unlock()
	if err := repairs.Wait(); err != nil {
		return nil, fmt.Errorf("saving repairs of restored state: %w", err)
	}
	return m, nil
}

type scale struct {
	MinIdle      int `json:"min_idle"`
	MaxInstances int `json:"max_instances"`
}

func (m *Manager) restore() error {
	insts, err := store.Load[*Instance](m.store, store.Instances)
	if err != nil {
		return err
	}
	leases, err := store.Load[*Lease](m.store, store.Leases)
	if err != nil {
		return err
	}
	batches, err := store.Load[*Batch](m.store, store.Batches)
	if err != nil {
		return err
	}
	now := m.clock.Now()
	m.restoredAt = now
	for _, in := range insts {
		if in.State == "failed" {
			// A state older versions passed through on the way to
			// terminating; a crash could leave it on disk.
			in.State = Terminating
		}
		in.accounted = now
		in.LastSeen = now
		m.index(in)
	}
	for _, l := range leases {
		m.leases[l.ID] = l
	}
	for _, b := range batches {
		m.indexBatch(b)
	}
	m.repairLocked()
	m.repairBatchesLocked()
	var pending []*Lease
	for _, l := range leases {
		if l.ClientToken != "" {
			m.byClient[clientKey(l.Pool, l.Owner, l.ClientToken)] = l
		}
		if l.State == LeasePending {
			pending = append(pending, l)
		}
		if l.State == LeaseActive && l.Run != nil {
			// Its output was only in the memory of the process that died.
			m.runs[l.ID] = m.newRunOutput(l.Run.ID, restartMarker)
		}
	}
	sort.Slice(pending, func(i, j int) bool { return pending[i].CreatedAt.Before(pending[j].CreatedAt) })
	for _, l := range pending {
		if p := m.pools[l.Pool]; p != nil {
			// A client that was waiting had its connection cut by the
			// restart; give it time to come back for its lease.
			l.ExpiresAt = now.Add(pendingGrace)
			p.queue = append(p.queue, l)
		}
	}
	m.log.Info("restored state", "instances", len(insts), "leases", len(leases), "batches", len(batches), "pending", len(pending))
	return nil
}

func (m *Manager) index(in *Instance) {
	m.instances[in.Key] = in
	if p := m.pools[in.Pool]; p != nil {
		p.count[in.State]++
		if in.State == Idle {
			p.idle[in.Key] = in
		}
	}
	if in.ID != "" {
		m.byID[in.ID] = in
	}
	// Tokens of instances on their way out stay revoked across restarts.
	if in.TokenHash != "" && in.State != Gone && in.State != Terminating {
		m.byToken[in.TokenHash] = in
		for _, h := range in.EarlierTokenHashes {
			m.byToken[h] = in
		}
		if in.NextTokenHash != "" {
			m.byToken[in.NextTokenHash] = in
		}
	}
}

// revokeTokens makes every token of in useless. Caller holds m.mu.
func (m *Manager) revokeTokens(in *Instance) {
	delete(m.byToken, in.TokenHash)
	for _, h := range in.EarlierTokenHashes {
		delete(m.byToken, h)
	}
	delete(m.byToken, in.NextTokenHash)
}

// Run works the pools until ctx ends: it reconciles with the clouds at once
// and every reconcile interval, and checks timers every tick.
func (m *Manager) Run(ctx context.Context) {
	if m.opts.Simulation != nil {
		panic("pool: Run on a Manager made for a simulation; drive it with Step")
	}
	m.resolveBakedImages(ctx, true) // before anything is launched
	m.reconcile(ctx)
	m.mu.Lock()
	m.resumeLocked()
	m.dispatchLocked()
	m.unlock()
	tick := m.clock.NewTicker(m.tick)
	defer tick.Stop()
	rec := m.clock.NewTicker(m.opts.ReconcileInterval)
	defer rec.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C():
			m.mu.Lock()
			m.timersLocked()
			m.dispatchLocked()
			m.unlock()
		case <-rec.C():
			m.reconcile(ctx)
		}
	}
}

// Close waits for cloud calls under way and writes what is queued. It does
// not end any instance: they are adopted at the next start.
func (m *Manager) Close() error {
	m.cancel()
	m.wg.Wait()
	m.mu.Lock()
	m.saveDemandLocked()
	last := m.synced()
	m.mu.Unlock()
	return last.Wait()
}

// notify wakes everyone waiting for a change. Caller holds m.mu.
func (m *Manager) notify() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// waitChange returns a channel closed at the next change. Caller holds m.mu.
func (m *Manager) waitChange() <-chan struct{} { return m.changed }

// wakeInstance wakes the assignment poll of in, if one waits: only changes
// that may change in's assignment do, so that a change to one instance
// does not wake the bootstrap of every other. Caller holds m.mu.
func (m *Manager) wakeInstance(in *Instance) {
	if in != nil && in.wake != nil {
		close(in.wake)
		in.wake = nil
	}
}

// instanceChange returns a channel closed at the next wakeInstance of in.
// Caller holds m.mu.
func (m *Manager) instanceChange(in *Instance) <-chan struct{} {
	if in.wake == nil {
		in.wake = make(chan struct{})
	}
	return in.wake
}

func (m *Manager) saveInstance(in *Instance) {
	m.write(store.Op{Kind: store.Instances, ID: in.Key, Value: in})
}

func (m *Manager) saveLease(l *Lease) {
	m.write(store.Op{Kind: store.Leases, ID: l.ID, Value: l})
}

// write adds op to the decision under way. Caller holds m.mu.
func (m *Manager) write(op store.Op) { m.ops = append(m.ops, op) }

// commitLocked queues the writes of the decision under way as one store
// transaction: a lease and its instance, or an intent and the lease it is
// for, land on disk together or not at all. Each record is encoded as it
// is now, once. Caller holds m.mu.
func (m *Manager) commitLocked() {
	if len(m.ops) == 0 {
		return
	}
	type key struct {
		kind store.Kind
		id   string
	}
	seen := make(map[key]bool, len(m.ops))
	ops := m.ops[:0:0]
	for i := len(m.ops) - 1; i >= 0; i-- {
		k := key{m.ops[i].Kind, m.ops[i].ID}
		if !seen[k] {
			seen[k] = true
			ops = append(ops, m.ops[i])
		}
	}
	m.ops = m.ops[:0]
	m.lastSave = m.store.Commit(ops...)
}

// unlock ends a decision: its writes go to the store as one transaction,
// then m.mu is released. Every critical section ends here, never with a
// bare m.mu.Unlock, so no decision is ever split across transactions.
func (m *Manager) unlock() {
	m.commitLocked()
	m.mu.Unlock()
}

// synced commits the decision so far and returns the latest queued write;
// waiting on it means everything changed so far is on disk. Caller holds
// m.mu.
func (m *Manager) synced() *store.Commit {
	m.commitLocked()
	if m.lastSave == nil {
		return m.store.Commit()
	}
	return m.lastSave
}

func (m *Manager) goAsync(f func(ctx context.Context)) {
	if m.opts.Simulation != nil {
		// Made by Settle, in order: the same calls, the same results.
		m.deferredMu.Lock()
		m.deferred = append(m.deferred, f)
		m.deferredMu.Unlock()
		return
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		f(m.ctx)
	}()
}

// randomToken returns n random bytes, URL-safe base64 without padding.
func randomToken(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// unknownPool is the error for a pool name that is none of the pools, which
// it lists. The set of pools is fixed in New, so no lock is needed.
func (m *Manager) unknownPool(name string) error {
	names := slices.Sorted(maps.Keys(m.pools))
	if len(names) == 0 {
		return fmt.Errorf("%w %q: the config has no pools", ErrUnknownPool, name)
	}
	return fmt.Errorf("%w %q (pools: %s)", ErrUnknownPool, name, strings.Join(names, ", "))
}
