package sim

import (
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/store"
	"github.com/hangar-ci/hangar/userdata"
)

// Start is the virtual moment a trace starts: a Monday at midnight UTC, so
// that a trace's seconds fall on the days and hours they mean to.
var Start = time.Date(2030, 1, 7, 0, 0, 0, 0, time.UTC)

// Options are what every policy of a simulation shares.
type Options struct {
	// Pools are the specs of the pools the trace's jobs go to, as the
	// config maps them (cmd/hangar's poolSpec). What the simulation has no
	// use for (caches, baked or copied images, the user-data's format) is
	// dropped; leases are renewed by their holders, so never expire.
	Pools map[string]pool.Spec
	Boot  Boot
	// Seed seeds the boot samples and the pool's ids: the same seed, the
	// same run.
	Seed uint64
	// Tick is how often the pool's timers run, as Options.Tick (1s).
	Tick time.Duration
	// EveryTick steps the pool at every tick rather than only when its
	// timers could act: slower, and the same result (TestSteppingIsExact).
	EveryTick bool
	// Progress, when set, is told now and then how many jobs have ended.
	Progress func(done, total int)
}

// Result is what one policy did with a trace.
type Result struct {
	Policy string
	// MinIdle and IdleTTD are the policy's settings: with several pools,
	// the sum of their min_idle and the longest idle_ttd; nil when the
	// pool sizes itself (auto).
	MinIdle *int
	IdleTTD *time.Duration
	Jobs    int
	// The jobs' waits, from lease request to assignment.
	WaitP50, WaitP95, WaitP99, WaitMax time.Duration
	// Instance time: from launch (or start) to the end, but for time
	// stopped; of which idle (idle, releasing) and booting (launching,
	// booting, starting).
	InstanceTime, IdleTime, BootTime time.Duration
	// Launches counts boots: launches, and starts of stopped instances.
	Launches int
}

// Policy is how the pools are run: it adjusts each pool's spec.
type Policy struct {
	Name  string
	apply func(name string, s *pool.Spec)
}

// OnDemand is the baseline of no warm pool, as Buildbot's latent workers:
// every job boots an instance of its own, which ends with it (min_idle 0,
// idle_ttd 0, max_uses 1).
func OnDemand() Policy {
	return Policy{Name: "on-demand", apply: func(_ string, s *pool.Spec) {
		s.MinIdle, s.IdleTTD, s.MaxUses, s.StopWhenIdle, s.Autoscale = 0, 0, 1, false, nil
	}}
}

// Config runs the pools as their config says.
func Config() Policy { return Policy{Name: "config", apply: func(string, *pool.Spec) {}} }

// Auto lets every pool size its spares itself (min_idle = "auto"), with
// its config's autoscale table if it has one, else a p95 wait target of 5s
// and at most 20 spares.
func Auto() Policy {
	return Policy{Name: "auto", apply: func(_ string, s *pool.Spec) {
		if s.Autoscale == nil {
			s.Autoscale = &pool.AutoscaleSpec{TargetWaitP95: 5 * time.Second, MaxIdle: min(20, s.MaxInstances)}
		}
	}}
}

// Fixed runs every pool with min_idle and idle_ttd (a grid point); the
// rest is the config's.
func Fixed(minIdle int, idleTTD time.Duration) Policy {
	return Policy{Name: "grid", apply: func(_ string, s *pool.Spec) {
		s.MinIdle, s.IdleTTD, s.Autoscale = minIdle, idleTTD, nil
	}}
}

// century is the simulated leases' ttl: their holders renew them.
const century = 100 * 365 * 24 * time.Hour

// housekeeping is how often the pool is stepped when nothing else calls
// for it, so that it forgets ended leases and gone instances.
const housekeeping = 10 * time.Minute

// Simulate runs jobs (in submit order) through the real pool manager under
// policy and measures the result.
func Simulate(ctx context.Context, jobs []Job, o Options, policy Policy) (Result, error) {
	e, err := newEngine(jobs, o, policy)
	if err != nil {
		return Result{}, err
	}
	defer func() { _ = e.m.Close() }() // nothing to write: the store discards
	if err := e.run(ctx); err != nil {
		return Result{}, fmt.Errorf("simulating policy %s: %w", policy.Name, err)
	}
	return e.result(), nil
}

type engine struct {
	m     *pool.Manager
	clock *vclock
	cloud *simCloud
	specs map[string]pool.Spec
	o     Options
	pol   Policy
	auto  bool // a pool sizes itself: step at every tick
	jobs  []Job
	rng   *rand.Rand

	ctx, done context.Context // done is canceled: calls that must not wait

	now       time.Duration // since Start
	queue     eventQueue
	seq       uint64
	next      int // the next job to submit
	ended     int // jobs ended
	scheduled map[time.Duration]bool
	lastStep  time.Duration
	pendings  int // events in the queue that make progress: job ends, boots

	observed []pool.Event // told by the pool, to handle
	byLease  map[string]int
	inst     map[string]*instState
	overdue  int // idle instances past their idle_ttd, kept by min_idle

	waits    []time.Duration
	spent    map[pool.State]time.Duration
	launches int
	err      error
}

// instState is the engine's view of one instance: its bootstrap's and its
// accounting.
type instState struct {
	id, key, pool string
	state         pool.State
	since         time.Duration
	gen           int    // its boots: a boot's end is for the latest only
	lease         string // the lease its worker runs for
	overdue       bool
}

func newEngine(jobs []Job, o Options, policy Policy) (*engine, error) {
	if o.Tick <= 0 {
		o.Tick = time.Second
	}
	e := &engine{
		clock: &vclock{}, specs: map[string]pool.Spec{}, o: o, pol: policy, jobs: jobs,
		rng:       rand.New(rand.NewPCG(o.Seed, 0x600d_b007)),
		scheduled: map[time.Duration]bool{}, lastStep: -1,
		byLease: map[string]int{}, inst: map[string]*instState{}, spent: map[pool.State]time.Duration{},
		waits: make([]time.Duration, 0, len(jobs)),
	}
	e.clock.set(Start)
	e.cloud = newSimCloud(e.clock)
	for _, j := range jobs {
		if _, ok := o.Pools[j.Pool]; !ok {
			return nil, fmt.Errorf("line %d: pool %q is not among the simulated pools", j.Line, j.Pool)
		}
	}
	for name, s := range o.Pools {
		s.Provider = "sim"
		s.LeaseTTL, s.MaxLeaseTTL = century, century
		s.Cache, s.Bake, s.ImageFrom = nil, nil, nil
		// One instance per launch call, with its token in its user-data:
		// the simulated cloud models no API rate, so batches would change
		// nothing it measures.
		s.LaunchBatch, s.Identity, s.SignedIdentity = 1, "", nil
		s.Launch.Image = cmp.Or(s.Launch.Image, "sim")
		// A script, whose token line the simulated instance reads.
		s.UserData = userdata.Params{Format: userdata.FormatScript}
		policy.apply(name, &s)
		if s.Autoscale != nil {
			e.auto = true
		}
		e.specs[name] = s
	}
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[:], o.Seed)
	var err error
	e.m, err = pool.New(pool.Options{
		Pools:             e.specs,
		PublicURL:         "http://hangar.sim.invalid",
		ReconcileInterval: time.Minute,
		OrphanGrace:       5 * time.Minute,
		Providers:         map[string]cloud.Provider{"sim": e.cloud},
		Store:             store.Discard(),
		Logger:            slog.New(slog.DiscardHandler),
		Clock:             e.clock,
		Tick:              o.Tick,
		Simulation: &pool.Simulation{
			IDs:     rand.NewChaCha8(seed),
			Observe: func(ev pool.Event) { e.observed = append(e.observed, ev) },
		},
	})
	if err != nil {
		return nil, fmt.Errorf("starting the simulated pools: %w", err)
	}
	e.ctx = context.Background()
	done, cancel := context.WithCancel(e.ctx)
	cancel()
	e.done = done
	return e, nil
}

// Event kinds, in the order they are handled at one moment: jobs end,
// instances finish booting, jobs are submitted, then the pool's timers.
const (
	evEnd = iota
	evBoot
	evSubmit // not queued: the trace is read in order
	evRenew
	evIdleDeadline
	evBootDeadline
	evStep
)

type event struct {
	at    time.Duration
	kind  int
	seq   uint64
	job   int
	inst  *instState
	gen   int
	since time.Duration
	lease string
}

func (e *engine) push(ev event) {
	e.seq++
	ev.seq = e.seq
	if ev.kind == evEnd || ev.kind == evBoot {
		e.pendings++
	}
	e.queue.push(ev)
}

// stepAt makes the pool take a step at tick t.
func (e *engine) stepAt(t time.Duration) {
	if t <= e.lastStep {
		t = e.tickAfter(e.lastStep)
	}
	if e.scheduled[t] {
		return
	}
	e.scheduled[t] = true
	e.push(event{at: t, kind: evStep})
}

// tickAfter is the first tick after t; tickFrom, the first at t or after.
func (e *engine) tickAfter(t time.Duration) time.Duration { return (t/e.o.Tick + 1) * e.o.Tick }

func (e *engine) tickFrom(t time.Duration) time.Duration {
	return (t + e.o.Tick - 1) / e.o.Tick * e.o.Tick
}

func (e *engine) run(ctx context.Context) error {
	e.step() // as Run starts: min_idle launches
	e.stepAt(housekeeping)
	total := len(e.jobs)
	for e.ended < total {
		if e.err != nil {
			return e.err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		submitNext := e.next < total
		if !submitNext && e.pendings == 0 {
			// Nothing left that could end a job but the pool's own
			// timers: a step may launch what the queue needs.
			e.step()
			if e.pendings == 0 {
				return e.stalled()
			}
		}
		if submitNext && (e.queue.len() == 0 || less(event{at: e.jobs[e.next].Submit, kind: evSubmit}, e.queue.peek())) {
			e.advance(e.jobs[e.next].Submit)
			e.submit(e.next)
			e.next++
			continue
		}
		ev := e.queue.pop()
		if ev.kind == evEnd || ev.kind == evBoot {
			e.pendings--
		}
		e.advance(ev.at)
		switch ev.kind {
		case evEnd:
			e.end(ev)
		case evBoot:
			e.booted(ev)
		case evRenew:
			e.renew(ev)
		case evIdleDeadline:
			if st := ev.inst; st.state == pool.Idle && st.since == ev.since && !st.overdue {
				e.step()
				if st.state == pool.Idle && st.since == ev.since {
					// Kept by min_idle: reaped once more instances idle.
					st.overdue = true
					e.overdue++
				}
			}
		case evBootDeadline:
			if st := ev.inst; st.state == pool.Booting && st.since == ev.since {
				e.step()
			}
		case evStep:
			delete(e.scheduled, ev.at)
			e.step()
			if ev.at%housekeeping == 0 {
				e.stepAt(ev.at + housekeeping)
			}
		}
	}
	if e.err != nil {
		return e.err
	}
	// The simulation ends as the last job does: whatever runs on is not
	// the trace's cost.
	for _, st := range e.inst {
		e.account(st)
	}
	return nil
}

// stalled says why jobs wait for ever: nothing is booting or running, and
// the pool launches nothing for them.
func (e *engine) stalled() error {
	waiting := map[string]int{}
	for _, j := range e.byLease {
		waiting[e.jobs[j].Pool]++
	}
	names := slices.Sorted(maps.Keys(waiting))
	if len(names) == 0 {
		return fmt.Errorf("%d jobs did not end, and nothing is left to happen", len(e.jobs)-e.ended)
	}
	p := names[0]
	return fmt.Errorf("%d jobs of pool %s can never get an instance: it launches none (max_instances %d)", waiting[p], p, e.specs[p].MaxInstances)
}

func (e *engine) advance(t time.Duration) {
	if t > e.now {
		e.now = t
		e.clock.set(Start.Add(t))
	}
}

// step is one turn of the pool's timer loop at the current moment.
func (e *engine) step() {
	if e.now == e.lastStep {
		return
	}
	e.lastStep = e.now
	e.m.Step(e.ctx)
	e.drain()
	if e.auto || e.o.EveryTick {
		e.stepAt(e.tickAfter(e.now))
	}
}

// drain handles what the pool told since the last call, and what handling
// it makes the pool tell.
func (e *engine) drain() {
	for i := 0; i < len(e.observed); i++ {
		e.handle(e.observed[i])
	}
	e.observed = e.observed[:0]
}

func (e *engine) fail(err error) {
	if e.err == nil {
		e.err = err
	}
}

func (e *engine) submit(j int) {
	job := e.jobs[j]
	// With a done context the call does not wait; Wait sets how long the
	// pool keeps the lease pending before its holder must ask again.
	v, err := e.m.Lease(e.done, pool.Admin, pool.LeaseRequest{Pool: job.Pool, Wait: pool.MaxWait})
	if err != nil {
		e.fail(fmt.Errorf("line %d: lease: %w", job.Line, err))
		return
	}
	e.byLease[v.ID] = j
	e.m.Settle(e.ctx)
	e.drain()
	if _, pending := e.byLease[v.ID]; pending {
		e.push(event{at: e.now + pool.MaxWait, kind: evRenew, job: j, lease: v.ID})
	}
}

// renew asks after a pending lease again, as its waiting holder would.
func (e *engine) renew(ev event) {
	if _, pending := e.byLease[ev.lease]; !pending {
		return
	}
	if _, err := e.m.GetLease(e.done, pool.Admin, ev.lease, pool.MaxWait); err != nil {
		e.fail(fmt.Errorf("line %d: asking after lease: %w", e.jobs[ev.job].Line, err))
		return
	}
	e.push(event{at: e.now + pool.MaxWait, kind: evRenew, job: ev.job, lease: ev.lease})
}

func (e *engine) end(ev event) {
	if err := e.m.Release(e.ctx, pool.Admin, ev.lease, false); err != nil {
		e.fail(fmt.Errorf("line %d: release: %w", e.jobs[ev.job].Line, err))
		return
	}
	e.ended++
	if e.o.Progress != nil && e.ended%4096 == 0 {
		e.o.Progress(e.ended, len(e.jobs))
	}
	e.m.Settle(e.ctx)
	e.drain()
}

// booted is the instance's bootstrap starting: it authenticates with the
// token from its user-data and reports ready.
func (e *engine) booted(ev event) {
	st := ev.inst
	if st.gen != ev.gen || st.state != pool.Booting {
		return // ended, or booting again, meanwhile
	}
	if st.key == "" {
		token, ok := e.cloud.token(st.id)
		if !ok {
			return
		}
		key, err := e.m.Authenticate(bootstrap.HashToken(token))
		if err != nil {
			e.fail(fmt.Errorf("instance %s authenticating with its user-data token: %w", st.id, err))
			return
		}
		st.key = key
	}
	if err := e.m.Ready(e.ctx, st.key, bootstrap.Ready{}); err != nil {
		e.fail(fmt.Errorf("instance %s reporting ready: %w", st.id, err))
		return
	}
	e.m.Settle(e.ctx)
	e.drain()
}

// handle follows one pool event: it accounts the instance's time and does
// what its bootstrap does.
func (e *engine) handle(ev pool.Event) {
	if ev.Kind != pool.EventState {
		return
	}
	now := ev.Time.Sub(Start)
	st := e.inst[ev.Instance]
	if st == nil {
		st = &instState{id: ev.Instance, pool: ev.Pool, state: ev.From, since: now}
		e.inst[ev.Instance] = st
	}
	e.account(st)
	if st.overdue {
		st.overdue = false
		e.overdue--
	}
	st.state, st.since = ev.To, now
	spec := e.specs[st.pool]
	switch ev.To {
	case pool.Booting:
		e.launches++
		st.gen++
		e.push(event{at: now + e.o.Boot.sample(e.rng), kind: evBoot, inst: st, gen: st.gen})
		if spec.BootTimeout > 0 && !e.auto && !e.o.EveryTick {
			e.push(event{at: e.tickAfter(now + spec.BootTimeout), kind: evBootDeadline, inst: st, since: now})
		}
	case pool.Idle:
		if !e.auto && !e.o.EveryTick {
			e.push(event{at: e.tickAfter(now + spec.IdleTTD), kind: evIdleDeadline, inst: st, since: now})
			if e.overdue > 0 {
				// One more idle: one kept by min_idle may go now.
				e.stepAt(e.tickFrom(now))
			}
		}
	case pool.Leased:
		e.assigned(st, now)
	case pool.Releasing:
		e.released(st)
	case pool.Gone:
		delete(e.inst, st.id)
	}
}

func (e *engine) account(st *instState) {
	if d := e.now - st.since; d > 0 {
		e.spent[st.state] += d
	}
	st.since = e.now
}

// assigned is the bootstrap told of its lease (it starts the worker) and
// the lease's holder learning it has it (it claims it).
func (e *engine) assigned(st *instState, now time.Duration) {
	a, err := e.m.Assignment(e.ctx, st.key, bootstrap.Poll{})
	if err != nil {
		e.fail(fmt.Errorf("instance %s leased, polling for its assignment: %w", st.id, err))
		return
	}
	if a.State != bootstrap.AssignAssigned {
		e.fail(fmt.Errorf("instance %s leased, but its poll is answered %q", st.id, a.State))
		return
	}
	j, ok := e.byLease[a.LeaseID]
	if !ok {
		e.fail(fmt.Errorf("instance %s got lease %s, which no job asked for", st.id, a.LeaseID))
		return
	}
	delete(e.byLease, a.LeaseID)
	if _, err := e.m.GetLease(e.ctx, pool.Admin, a.LeaseID, 0); err != nil {
		e.fail(fmt.Errorf("line %d: claiming its lease: %w", e.jobs[j].Line, err))
		return
	}
	st.lease = a.LeaseID
	e.waits = append(e.waits, now-e.jobs[j].Submit)
	e.push(event{at: now + e.jobs[j].Duration, kind: evEnd, job: j, lease: a.LeaseID})
}

// released is the bootstrap told its lease is over: it stops the worker and
// polls again with none.
func (e *engine) released(st *instState) {
	a, err := e.m.Assignment(e.ctx, st.key, bootstrap.Poll{Current: st.lease})
	if err != nil {
		e.fail(fmt.Errorf("instance %s released, polling with its lease: %w", st.id, err))
		return
	}
	if a.State != bootstrap.AssignReleased {
		e.fail(fmt.Errorf("instance %s released, but its poll is answered %q", st.id, a.State))
		return
	}
	st.lease = ""
	if _, err := e.m.Assignment(e.ctx, st.key, bootstrap.Poll{}); err != nil {
		e.fail(fmt.Errorf("instance %s polling after its release: %w", st.id, err))
		return
	}
	e.m.Settle(e.ctx)
}

func (e *engine) result() Result {
	r := Result{Policy: e.pol.Name, Jobs: len(e.jobs), Launches: e.launches}
	for st, d := range e.spent {
		switch st {
		case pool.Stopped, pool.Gone:
			continue
		case pool.Idle, pool.Releasing:
			r.IdleTime += d
		case pool.Launching, pool.Booting, pool.Starting:
			r.BootTime += d
		}
		r.InstanceTime += d
	}
	slices.Sort(e.waits)
	r.WaitP50, r.WaitP95, r.WaitP99 = quantile(e.waits, 0.50), quantile(e.waits, 0.95), quantile(e.waits, 0.99)
	if n := len(e.waits); n > 0 {
		r.WaitMax = e.waits[n-1]
	}
	if !e.auto {
		minIdle, ttd := 0, time.Duration(0)
		for _, s := range e.specs {
			minIdle += s.MinIdle
			ttd = max(ttd, s.IdleTTD)
		}
		r.MinIdle, r.IdleTTD = &minIdle, &ttd
	}
	return r
}

// quantile is the nearest-rank q-quantile of sorted.
func quantile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

// eventQueue is a binary min-heap of events by (at, kind, seq): typed, so
// that a million pushes box nothing.
type eventQueue struct{ h []event }

func less(a, b event) bool {
	if a.at != b.at {
		return a.at < b.at
	}
	if a.kind != b.kind {
		return a.kind < b.kind
	}
	return a.seq < b.seq
}

func (q *eventQueue) len() int    { return len(q.h) }
func (q *eventQueue) peek() event { return q.h[0] }

func (q *eventQueue) push(ev event) {
	q.h = append(q.h, ev)
	i := len(q.h) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !less(q.h[i], q.h[p]) {
			break
		}
		q.h[i], q.h[p] = q.h[p], q.h[i]
		i = p
	}
}

func (q *eventQueue) pop() event {
	top := q.h[0]
	n := len(q.h) - 1
	q.h[0] = q.h[n]
	q.h[n] = event{}
	q.h = q.h[:n]
	i := 0
	for {
		l, r, m := 2*i+1, 2*i+2, i
		if l < n && less(q.h[l], q.h[m]) {
			m = l
		}
		if r < n && less(q.h[r], q.h[m]) {
			m = r
		}
		if m == i {
			break
		}
		q.h[i], q.h[m] = q.h[m], q.h[i]
		i = m
	}
	return top
}
