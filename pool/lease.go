package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode"
)

// LeaseState is where a lease is in its life.
type LeaseState string

const (
	LeasePending  LeaseState = "pending"  // waiting for an instance
	LeaseActive   LeaseState = "active"   // holds an instance
	LeaseReleased LeaseState = "released" // given back by its holder
	LeaseExpired  LeaseState = "expired"  // its TTL ran out without a renew
	LeaseCanceled LeaseState = "canceled" // ended while pending
	LeaseLost     LeaseState = "lost"     // its instance vanished
)

func (s LeaseState) ended() bool { return s != LeasePending && s != LeaseActive }

// leaseTransitions is the lease state machine; setLeaseState owns it.
//
//	pending ──assign──→ active ──release──→ released
//	   │                  ├──ttl──────→ expired
//	   │                  └──instance lost─→ lost
//	   └──release, nobody waiting──→ canceled
//
// An unclaimed active lease (see Lease.Unclaimed) ends released.
var leaseTransitions = map[LeaseState][]LeaseState{
	LeasePending:  {LeaseActive, LeaseCanceled},
	LeaseActive:   {LeaseReleased, LeaseExpired, LeaseLost},
	LeaseReleased: {},
	LeaseExpired:  {},
	LeaseCanceled: {},
	LeaseLost:     {},
}

// setLeaseState is the one place a lease changes state. It queues the
// record for the store, and refuses (loudly) a transition the table does
// not allow, reporting whether it made the change. The caller holds m.mu.
func (m *Manager) setLeaseState(l *Lease, to LeaseState) bool {
	if !slices.Contains(leaseTransitions[l.State], to) {
		m.illegal("lease", l.ID, string(l.State), string(to))
		return false
	}
	from := l.State
	l.State = to
	if to.ended() {
		l.EndedAt = m.clock.Now()
	}
	m.leaseChangedLocked(l, from)
	m.saveLease(l)
	m.wakeInstance(m.instances[l.InstanceKey])
	m.notify()
	return true
}

// Worker is what the instance's CI worker needs to connect to its master.
type Worker struct {
	Name     string `json:"name"`
	Password string `json:"password,omitempty"`
	Master   string `json:"master,omitempty"`
}

// Caller is who asks the manager for something: the API token's name and
// whether it has the admin role. In open loopback mode (no tokens) every
// caller is the admin "".
type Caller struct {
	Name  string
	Admin bool
}

// Admin is the caller with every right: the open dev mode, and Hangar's own
// integrations that run in the server's process.
var Admin = Caller{Admin: true}

// sees reports whether c may see and act on l: its owner, or an admin.
// Anyone else is told the lease does not exist, not that it is someone
// else's.
func (c Caller) sees(l *Lease) bool { return c.Admin || l.Owner == c.Name }

// Lease is a claim on one instance.
type Lease struct {
	ID   string `json:"id"`
	Pool string `json:"pool"`
	// Owner is the name of the API token that made the lease ("" in open
	// mode). Only it, or an admin, sees and acts on the lease.
	Owner       string            `json:"owner,omitempty"`
	State       LeaseState        `json:"state"`
	InstanceKey string            `json:"instance_key,omitempty"`
	Worker      Worker            `json:"worker"`
	Labels      map[string]string `json:"labels,omitempty"`
	ClientToken string            `json:"client_token,omitempty"`
	TTL         time.Duration     `json:"ttl"`
	Warm        bool              `json:"warm,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	AssignedAt  time.Time         `json:"assigned_at,omitempty"`
	// ExpiresAt is when an active lease ends without a renew, or when a
	// pending one is given up for want of a client asking after it.
	ExpiresAt time.Time `json:"expires_at"`
	EndedAt   time.Time `json:"ended_at,omitempty"`
	// Run is the latest command run on the lease's instance, if any.
	Run *Run `json:"run,omitempty"`
	// NoWorker: the lease was made to run a command, so its instance
	// starts no worker_command.
	NoWorker bool `json:"no_worker,omitempty"`
	// Unclaimed: active, but its holder has not been told so yet (its
	// request was cut by a crash or a timeout). Such a lease is released
	// after the pool's claim_timeout instead of holding its instance for
	// the whole ttl. Stored as "unclaimed" so that older records read as
	// claimed.
	Unclaimed bool `json:"unclaimed,omitempty"`

	waiters int // requests waiting for it now; in memory only
}

// LogValue keeps the worker password out of logs.
func (l *Lease) LogValue() slog.Value {
	return slog.GroupValue(slog.String("id", l.ID), slog.String("pool", l.Pool), slog.String("state", string(l.State)))
}

const (
	// pendingGrace is how long a pending lease waits for its client to ask
	// after it again once the client's own wait is over.
	pendingGrace = 2 * time.Minute
	// endedKept is how long an ended lease can still be read.
	endedKept = time.Hour
	// releaseTimeout bounds how long a released instance may take to stop
	// its worker before it is thought broken and terminated.
	releaseTimeout = 2 * time.Minute
	// MaxWait caps how long one request may wait for a lease.
	MaxWait = 15 * time.Minute
	// MinTTL is the shortest lease a client may ask for: a lease must live
	// long enough to be renewed.
	MinTTL = time.Second
)

// LeaseRequest is a client's ask for an instance.
type LeaseRequest struct {
	Pool        string
	Wait        time.Duration
	TTL         time.Duration // 0: the pool's lease_ttl
	Worker      Worker        // Name "" gets a generated one; Password "" gets the instance's own
	Labels      map[string]string
	ClientToken string
	// Command, when not empty, is run on the instance in place of the
	// pool's worker_command (argv; run 1 of the lease).
	Command []string
}

// LeaseView is a lease as the API shows it to its holder.
type LeaseView struct {
	ID        string            `json:"id"`
	Pool      string            `json:"pool"`
	Owner     string            `json:"owner,omitempty"`
	State     LeaseState        `json:"state"`
	Instance  *LeaseInstance    `json:"instance,omitempty"`
	Worker    Worker            `json:"worker"`
	Labels    map[string]string `json:"labels,omitempty"`
	CreatedAt time.Time         `json:"created_at"`
	ExpiresAt time.Time         `json:"expires_at"`
	Run       *RunView          `json:"run,omitempty"`
	// Ahead is, for a pending lease, how many leases of its pool's queue
	// come before it.
	Ahead int `json:"ahead,omitempty"`
}

// LeaseInstance is the part of an instance a lease holder sees.
type LeaseInstance struct {
	ID         string `json:"id"`
	PrivateIP  string `json:"private_ip"`
	State      State  `json:"state"`
	SSHHostKey string `json:"ssh_host_key,omitempty"`
}

var (
	workerNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	labelKeyRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$`)
)

func validateRequest(r LeaseRequest, maxTTL time.Duration) error {
	var problems []error
	bad := func(format string, a ...any) { problems = append(problems, fmt.Errorf(format, a...)) }
	if r.Wait < 0 || r.Wait > MaxWait {
		bad("wait must be between 0s and %s", MaxWait)
	}
	// 0 is "the pool's lease_ttl".
	if r.TTL != 0 && (r.TTL < MinTTL || r.TTL > maxTTL) {
		bad("ttl must be between %s and the pool's max_lease_ttl (%s)", MinTTL, maxTTL)
	}
	if r.Worker.Name != "" && !workerNameRE.MatchString(r.Worker.Name) {
		bad("worker.name must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if p := r.Worker.Password; p != "" && (len(p) > 256 || !printable(p)) {
		bad("worker.password must be at most 256 printable characters")
	}
	if r.Worker.Master != "" && !validMaster(r.Worker.Master) {
		bad("worker.master must be host:port or an http:// or https:// URL")
	}
	if len(r.Labels) > 32 {
		bad("at most 32 labels")
	}
	for k, v := range r.Labels {
		if !labelKeyRE.MatchString(k) || len(v) > 256 || !printable(v) {
			bad("label %q: keys are 1-63 letters, digits, '.', '_', '/' or '-'; values at most 256 printable characters", k)
		}
	}
	if len(r.ClientToken) > 128 || !printable(r.ClientToken) {
		bad("client_token must be at most 128 printable characters")
	}
	problems = append(problems, commandProblems(r.Command)...)
	if len(problems) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %w", ErrInvalid, errors.Join(problems...))
}

// validMaster accepts host:port, as a Buildbot master is named, or the
// http(s) root URL of a Jenkins controller, whose inbound agents connect to
// a URL and may sit under a path.
func validMaster(m string) bool {
	// A leading '-' would read as an option to whatever worker command
	// takes the master as an argument.
	if len(m) > 255 || !printable(m) || strings.ContainsAny(m, " \t") || strings.HasPrefix(m, "-") {
		return false
	}
	if strings.HasPrefix(m, "http://") || strings.HasPrefix(m, "https://") {
		u, err := url.Parse(m)
		// No user info: it would reach the instance as a credential.
		return err == nil && u.Host != "" && u.User == nil
	}
	host, port, err := net.SplitHostPort(m)
	return err == nil && host != "" && port != "" && !strings.Contains(m, "/")
}

func printable(s string) bool {
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// Lease asks pool for an instance and waits up to r.Wait for one. A lease
// not fulfilled by then is returned pending; the client asks again with
// GetLease. Whatever it returns is on disk.
func (m *Manager) Lease(ctx context.Context, c Caller, r LeaseRequest) (LeaseView, error) {
	m.mu.Lock()
	p, ok := m.pools[r.Pool]
	if !ok {
		m.unlock()
		return LeaseView{}, m.unknownPool(r.Pool)
	}
	if err := validateRequest(r, p.spec.MaxLeaseTTL); err != nil {
		m.unlock()
		return LeaseView{}, err
	}
	if r.ClientToken != "" {
		if l, ok := m.byClient[clientKey(r.Pool, c.Name, r.ClientToken)]; ok {
			m.unlock()
			return m.waitLease(ctx, c, l.ID, r.Wait, false)
		}
	}
	now := m.clock.Now()
	l := &Lease{
		ID:          "l-" + m.newID(12),
		Pool:        r.Pool,
		Owner:       c.Name,
		State:       LeasePending,
		Worker:      r.Worker,
		Labels:      r.Labels,
		ClientToken: r.ClientToken,
		TTL:         r.TTL,
		CreatedAt:   now,
		ExpiresAt:   now.Add(r.Wait + pendingGrace),
	}
	if len(r.Command) > 0 {
		l.Run = &Run{ID: 1, Command: slices.Clone(r.Command)}
		l.NoWorker = true
	}
	if l.TTL == 0 {
		l.TTL = p.spec.LeaseTTL
	}
	if l.Worker.Name == "" {
		l.Worker.Name = r.Pool + "-" + l.ID[2:10]
	}
	m.leases[l.ID] = l
	if l.ClientToken != "" {
		m.byClient[clientKey(l.Pool, l.Owner, l.ClientToken)] = l
	}
	// Its creator waits for it below: a lease fulfilled at once is claimed
	// in the same transaction that assigns it.
	waiting := ctx.Err() == nil
	if waiting {
		l.waiters++
	}
	p.queue = append(p.queue, l)
	m.leaseRequestedLocked(p, now)
	m.saveLease(l)
	m.log.Info("lease requested", "pool", r.Pool, "lease", l.ID, "worker", l.Worker.Name)
	m.dispatchLocked()
	m.unlock()
	return m.waitLease(ctx, c, l.ID, r.Wait, waiting)
}

// clientKey indexes leases by client token. Idempotency is per owner: two
// callers that pick the same token (a guessable job id) get a lease each,
// never each other's.
func clientKey(pool, owner, token string) string { return pool + "\x00" + owner + "\x00" + token }

// leaseLocked returns lease id if c may see it. Caller holds m.mu.
func (m *Manager) leaseLocked(c Caller, id string) (*Lease, error) {
	l, ok := m.leases[id]
	if !ok || !c.sees(l) {
		return nil, fmt.Errorf("%w %q", ErrUnknownLease, id)
	}
	return l, nil
}

// GetLease returns the lease, waiting up to wait while it is pending.
func (m *Manager) GetLease(ctx context.Context, c Caller, id string, wait time.Duration) (LeaseView, error) {
	if wait < 0 || wait > MaxWait {
		return LeaseView{}, fmt.Errorf("%w: wait must be between 0s and %s", ErrInvalid, MaxWait)
	}
	return m.waitLease(ctx, c, id, wait, false)
}

func (m *Manager) waitLease(ctx context.Context, c Caller, id string, wait time.Duration, counted bool) (LeaseView, error) {
	deadline := m.clock.NewTimer(wait)
	defer deadline.Stop()
	var waitingFor *Lease
	defer func() {
		if waitingFor != nil {
			m.mu.Lock()
			waitingFor.waiters--
			m.unlock()
		}
	}()
	for {
		m.mu.Lock()
		l, err := m.leaseLocked(c, id)
		if err != nil {
			m.unlock()
			return LeaseView{}, err
		}
		if waitingFor == nil {
			waitingFor = l
			if !counted {
				l.waiters++
			}
		}
		if l.State == LeasePending {
			// Someone still wants it: keep it in the queue.
			if exp := m.clock.Now().Add(wait + pendingGrace); exp.After(l.ExpiresAt) {
				l.ExpiresAt = exp
			}
		}
		if l.State == LeaseActive && l.Unclaimed && ctx.Err() == nil {
			// Its holder is about to learn it has it.
			l.Unclaimed = false
			m.saveLease(l)
		}
		v := m.viewLocked(l)
		changed := m.waitChange()
		saved := m.synced()
		m.unlock()
		if v.State != LeasePending {
			if err := saved.Wait(); err != nil {
				return LeaseView{}, fmt.Errorf("saving lease %s: %w", id, err)
			}
			return v, nil
		}
		select {
		case <-changed:
			continue
		case <-deadline.C():
		case <-ctx.Done():
		}
		if err := saved.Wait(); err != nil {
			return LeaseView{}, fmt.Errorf("saving lease %s: %w", id, err)
		}
		return v, nil
	}
}

func (m *Manager) viewLocked(l *Lease) LeaseView {
	v := LeaseView{ID: l.ID, Pool: l.Pool, Owner: l.Owner, State: l.State, Worker: l.Worker, Labels: l.Labels, CreatedAt: l.CreatedAt, ExpiresAt: l.ExpiresAt}
	if l.Run != nil {
		v.Run = &RunView{ID: l.Run.ID}
	}
	if p := m.pools[l.Pool]; p != nil && l.State == LeasePending {
		v.Ahead = max(slices.Index(p.queue, l), 0)
	}
	if in, ok := m.instances[l.InstanceKey]; ok && l.InstanceKey != "" {
		v.Instance = &LeaseInstance{ID: in.ID, PrivateIP: in.PrivateIP, State: in.State, SSHHostKey: in.SSHHostKey}
	}
	return v
}

// Renew extends an active lease by its TTL from now.
func (m *Manager) Renew(ctx context.Context, c Caller, id string) (LeaseView, error) {
	m.mu.Lock()
	l, err := m.leaseLocked(c, id)
	if err != nil {
		m.unlock()
		return LeaseView{}, err
	}
	switch l.State {
	case LeaseActive:
		l.ExpiresAt = m.clock.Now().Add(l.TTL)
		l.Unclaimed = false
	case LeasePending:
		l.ExpiresAt = m.clock.Now().Add(pendingGrace)
	default:
		m.unlock()
		return LeaseView{}, fmt.Errorf("%w: %s is %s", ErrLeaseEnded, id, l.State)
	}
	m.saveLease(l)
	v := m.viewLocked(l)
	saved := m.synced()
	m.unlock()
	if err := saved.Wait(); err != nil {
		return LeaseView{}, fmt.Errorf("saving lease %s: %w", id, err)
	}
	return v, nil
}

// Release ends a lease. Its instance goes back to the pool once its worker
// has stopped, or is terminated when discard is set, when it has served
// max_uses, or when it is draining. Releasing an ended lease is a no-op.
func (m *Manager) Release(ctx context.Context, c Caller, id string, discard bool) error {
	m.mu.Lock()
	l, err := m.leaseLocked(c, id)
	if err != nil {
		m.unlock()
		return err
	}
	if !l.State.ended() {
		if l.State == LeasePending {
			m.endLeaseLocked(l, LeaseCanceled, false)
		} else {
			m.endLeaseLocked(l, LeaseReleased, discard)
		}
		m.dispatchLocked()
	}
	saved := m.synced()
	m.unlock()
	if err := saved.Wait(); err != nil {
		return fmt.Errorf("saving lease %s: %w", id, err)
	}
	return nil
}

// endLeaseLocked ends l and decides what becomes of its instance.
func (m *Manager) endLeaseLocked(l *Lease, to LeaseState, discard bool) {
	prev := l.State
	if !m.setLeaseState(l, to) {
		return
	}
	m.endRunLocked(l.ID)
	m.log.Info("lease ended", "pool", l.Pool, "lease", l.ID, "state", to, "discard", discard)
	if prev == LeasePending {
		if p := m.pools[l.Pool]; p != nil {
			p.queue = removeLease(p.queue, l)
		}
		return
	}
	in, ok := m.instances[l.InstanceKey]
	if !ok || in.LeaseID != l.ID {
		return
	}
	in.LeaseID = ""
	p := m.pools[in.Pool]
	switch {
	case in.State == Draining:
		m.terminateLocked(in, ReasonDrain)
	case to == LeaseExpired:
		// Its holder vanished mid-build: the machine's state is unknown.
		m.terminateLocked(in, ReasonLeaseExpired)
	case discard:
		m.terminateLocked(in, ReasonDiscard)
	case p == nil:
		m.terminateLocked(in, ReasonPoolRemoved)
	case p.spec.MaxUses > 0 && in.Uses >= p.spec.MaxUses:
		m.terminateLocked(in, ReasonMaxUses)
	case in.State == Leased:
		m.setState(in, Releasing, ReasonReleased)
	}
}

func removeLease(q []*Lease, l *Lease) []*Lease {
	for i, x := range q {
		if x == l {
			return append(q[:i:i], q[i+1:]...)
		}
	}
	return q
}

// dispatchLocked hands idle instances to queued leases, then launches or
// starts what the queue and min_idle still need, within max_instances.
// Caller holds m.mu.
func (m *Manager) dispatchLocked() {
	for _, name := range m.poolNames {
		m.dispatchPool(m.pools[name])
	}
}

func (m *Manager) dispatchPool(p *poolState) {
	// Counted, not walked: a busy pool dispatches at every lease, release
	// and ready report.
	c := p.count
	// Releasing ones are idle as soon as their worker stops.
	coming := c[Launching] + c[Booting] + c[Starting] + c[Releasing]
	if len(p.queue) == 0 && p.minIdle()-c[Idle]-coming <= 0 {
		return // nothing to hand out, and enough for min_idle
	}
	idle := make([]*Instance, 0, len(p.idle))
	for _, in := range p.idle {
		if in.refresh == nil {
			idle = append(idle, in)
		} else {
			coming++ // its cache is being snapshotted: idle again in a moment
		}
	}
	live := 0
	for st, n := range c {
		if st.live() {
			live += n
		}
	}
	launching := c[Launching]
	// Most recently idle first: the others age toward idle_ttd and the
	// reaper can shrink the pool.
	bySince(idle, true)
	for len(p.queue) > 0 && len(idle) > 0 {
		l, in := p.queue[0], idle[0]
		p.queue, idle = p.queue[1:], idle[1:]
		m.assignLocked(l, in)
	}
	need := len(p.queue) + p.minIdle() - len(idle) - coming
	if need > 0 && c[Stopped] > 0 {
		var stopped []*Instance
		for _, in := range m.instances {
			if in.Pool == p.name && in.State == Stopped && in.op == OpNone {
				stopped = append(stopped, in)
			}
		}
		bySince(stopped, true)
		for need > 0 && len(stopped) > 0 {
			m.startLocked(stopped[0])
			stopped = stopped[1:]
			need--
		}
	}
	now := m.clock.Now()
	if need <= 0 || p.blocked || now.Before(p.retryAt) || p.spec.ImageFrom != nil && p.bakedImage == "" {
		// An image from elsewhere not copied here yet: leases wait for it.
		return
	}
	if p.spec.batched() {
		// Calls are counted, not instances: a batch of 50 is one call.
		// Its slots count as live at once, so neither the store nor the
		// cloud (asked for at most max_instances − live) ever exceeds
		// max_instances.
		for need > 0 && live < p.spec.MaxInstances && p.launchCalls < maxLaunchCalls {
			k := batchSize(p, need, p.spec.MaxInstances-live)
			m.launchBatchLocked(p, k)
			need -= k
			live += k
		}
		return
	}
	for ; need > 0 && live < p.spec.MaxInstances && launching < maxLaunching; need-- {
		m.launchLocked(p)
		live++
		launching++
	}
}

// maxLaunching bounds a pool's launch calls under way. The rest of a large
// scale-out waits here rather than in the provider's rate limiter, where it
// would run into its call timeout (at EC2's 2 RunInstances a second, 500
// queued calls take four minutes). Each launch that returns dispatches the
// next. A pool that launches one instance per call counts its launching
// instances; one that launches batches, its calls (maxLaunchCalls).
const (
	maxLaunching   = 10
	maxLaunchCalls = maxLaunching
)

// bySince orders instances by when they entered their state, ties by key:
// the pool's choices depend on its state only, never on map order.
func bySince(s []*Instance, newestFirst bool) {
	slices.SortFunc(s, func(a, b *Instance) int {
		if newestFirst {
			a, b = b, a
		}
		if c := a.Since.Compare(b.Since); c != 0 {
			return c
		}
		return strings.Compare(a.Key, b.Key)
	})
}

func (m *Manager) assignLocked(l *Lease, in *Instance) {
	now := m.clock.Now()
	if !m.setLeaseState(l, LeaseActive) {
		return
	}
	l.InstanceKey = in.Key
	l.AssignedAt = now
	l.ExpiresAt = now.Add(l.TTL)
	l.Warm = in.ReadyAt.Before(l.CreatedAt)
	l.Unclaimed = l.waiters == 0
	if l.Worker.Password == "" {
		l.Worker.Password = in.Password
	}
	in.LeaseID = l.ID
	in.Uses++
	m.saveLease(l)
	m.setState(in, Leased, ReasonLeased)
	if m.metrics != nil {
		kind := "cold"
		if l.Warm {
			kind = "warm"
		}
		m.metrics.LeaseWait.WithLabelValues(l.Pool, kind).Observe(now.Sub(l.CreatedAt).Seconds())
	}
	m.log.Info("lease fulfilled", "pool", l.Pool, "lease", l.ID, "instance", in.ID, "warm", l.Warm)
}
