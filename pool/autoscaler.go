package pool

import (
	"cmp"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/pool/store"
)

// autoscaleEvery is how often an autoscaled pool's target is recomputed
// at most: a tick is a second, and the estimates move over minutes.
const autoscaleEvery = 5 * time.Second

// autoscaler is an autoscaled pool's history and its latest decision.
type autoscaler struct {
	spec      AutoscaleSpec
	demand    *demand
	decision  AutoscaleDecision
	decidedAt time.Time
	// savedAt is the minute (unix minutes) of the last write of demand;
	// dirty, that it changed since.
	savedAt int64
	dirty   bool
	// allowed is the idle share in force, counted with each request.
	allowed float64
	// held are the pool's active leases in the order they were assigned
	// (and some that ended since, dropped at the next decision), once
	// heldKnown: kept by leaseChangedLocked so that a decision need not
	// walk every lease of every pool.
	held      []*Lease
	heldKnown bool
}

// newAutoscaler starts p's autoscaler from its stored history, if any.
func newAutoscaler(spec AutoscaleSpec, stored *demand, now time.Time) *autoscaler {
	a := &autoscaler{spec: spec, demand: stored, savedAt: math.MinInt64}
	if !stored.usable() {
		a.demand = newDemand(now)
	}
	a.savedAt = floorDiv(now.Unix(), 60)
	return a
}

// minIdle is the idle spares p keeps: the autoscaler's target, or min_idle.
func (p *poolState) minIdle() int {
	if p.auto != nil {
		return p.auto.decision.TargetIdle
	}
	return p.spec.MinIdle
}

// idleTTD is how long an idle instance above minIdle is kept.
func (p *poolState) idleTTD() time.Duration {
	if p.auto != nil {
		return p.auto.decision.IdleTTD
	}
	return p.spec.IdleTTD
}

// leaseRequestedLocked counts a new lease request in p's history.
func (m *Manager) leaseRequestedLocked(p *poolState, now time.Time) {
	if p.auto != nil {
		p.auto.demand.arrival(now)
		p.auto.demand.requested(p.auto.decision.Deliberate, p.auto.allowed)
		p.auto.dirty = true
	}
}

// bootObservedLocked counts in's boot, launch (or start) to ready, in its
// pool's history.
func (m *Manager) bootObservedLocked(in *Instance) {
	p := m.pools[in.Pool]
	if p == nil || p.auto == nil || in.ReadyAt.IsZero() {
		return
	}
	from := in.LaunchedAt
	if from.IsZero() || in.ReadyAt.Before(from) {
		// Its ready report beat the launch call's answer.
		from = in.IntentAt
	}
	if b := in.ReadyAt.Sub(from); b >= 0 {
		p.auto.demand.observeBoot(b)
		p.auto.dirty = true
	}
}

// leaseChangedLocked follows l's change of state from from (setLeaseState):
// an autoscaled pool keeps its active leases in view, and counts how long
// a released one held its instance, for the releases expected soon.
func (m *Manager) leaseChangedLocked(l *Lease, from LeaseState) {
	p := m.pools[l.Pool]
	if p == nil || p.auto == nil {
		return
	}
	a := p.auto
	if l.State == LeaseActive && a.heldKnown {
		a.held = append(a.held, l)
	}
	if from != LeaseActive || l.State != LeaseReleased || l.AssignedAt.IsZero() {
		return
	}
	a.demand.observeLease(l.EndedAt.Sub(l.AssignedAt))
	a.demand.served(l.AssignedAt.Sub(l.CreatedAt) > a.spec.TargetWaitP95)
	a.dirty = true
}

// heldLocked is p's active leases in the order they were assigned: found
// by walking every lease the first time (after a restart), kept by
// leaseChangedLocked after.
func (m *Manager) heldLocked(p *poolState) []*Lease {
	a := p.auto
	if !a.heldKnown {
		for _, l := range m.leases {
			if l.Pool == p.name && l.State == LeaseActive {
				a.held = append(a.held, l)
			}
		}
		slices.SortFunc(a.held, func(x, y *Lease) int {
			return cmp.Or(x.AssignedAt.Compare(y.AssignedAt), strings.Compare(x.ID, y.ID))
		})
		a.heldKnown = true
	}
	a.held = slices.DeleteFunc(a.held, func(l *Lease) bool { return l.State != LeaseActive })
	return a.held
}

// autoscaleLocked recomputes p's target when it is due, and writes p's
// history when it changed and a minute has passed since the last write
// (in the transaction of the decision under way).
func (m *Manager) autoscaleLocked(p *poolState, now time.Time) {
	a := p.auto
	if a == nil {
		return
	}
	if a.decidedAt.IsZero() || now.Sub(a.decidedAt) >= autoscaleEvery || now.Before(a.decidedAt) {
		a.decision = DecideAutoscale(m.autoscaleInputLocked(p, now))
		a.decidedAt = now
	}
	if minute := floorDiv(now.Unix(), 60); a.dirty && minute > a.savedAt {
		a.savedAt, a.dirty = minute, false
		m.write(store.Op{Kind: store.Demand, ID: p.name, Value: a.demand})
	}
}

// saveDemandLocked writes every history changed since its last write: at
// Close, so that a restart loses none of it.
func (m *Manager) saveDemandLocked() {
	for _, p := range m.pools {
		if a := p.auto; a != nil && a.dirty {
			a.dirty = false
			m.write(store.Op{Kind: store.Demand, ID: p.name, Value: a.demand})
		}
	}
}

// autoscaleInputLocked gathers p's estimates.
func (m *Manager) autoscaleInputLocked(p *poolState, now time.Time) AutoscaleInput {
	d := p.auto.demand
	p50, p90 := d.bootQuantiles()
	in := AutoscaleInput{
		RecentRate:    d.recentRate(now),
		HistoryRate:   d.historyRate(now),
		Batches:       d.batches(),
		Since:         max(now.Sub(d.LastAt), 0),
		BootP50:       p50,
		BootP90:       p90,
		TargetWaitP95: p.auto.spec.TargetWaitP95,
		MaxIdle:       p.auto.spec.MaxIdle,
		MaxInstances:  p.spec.MaxInstances,
		IdleTTD:       p.spec.IdleTTD,
	}
	for st, n := range p.count {
		switch {
		case !st.live(), st == Idle, st == Launching, st == Booting, st == Starting, st == Stopped:
		default:
			in.Busy += n
		}
	}
	share := IdleShare(d.missedShare())
	in.ActiveFor, in.ActiveRate = d.activeFor(share)
	p.auto.allowed = 0
	if in.ActiveFor > 0 {
		p.auto.allowed = share
	} else {
		in.ActiveRate = d.rateSinceStart(now)
	}
	// The youngest first, as expectedFrees needs them: the latest
	// assigned first, sorted only if the clock went back.
	var ages []time.Duration
	held := m.heldLocked(p)
	for i := len(held) - 1; i >= 0; i-- {
		if l := held[i]; m.returnsToPoolLocked(p, l) {
			ages = append(ages, now.Sub(l.AssignedAt))
		}
	}
	if !slices.IsSorted(ages) {
		slices.Sort(ages)
	}
	in.ExpectedFrees = d.expectedFrees(ages, PlanningWindow(p90, in.TargetWaitP95))
	return in
}

// returnsToPoolLocked says whether l's instance comes back idle when l
// ends, as far as the pool knows now: not one draining or at max_uses,
// which end with their lease and free nothing.
func (m *Manager) returnsToPoolLocked(p *poolState, l *Lease) bool {
	in, ok := m.instances[l.InstanceKey]
	if !ok || in.State != Leased {
		return false
	}
	return p.spec.MaxUses == 0 || in.Uses < p.spec.MaxUses
}
