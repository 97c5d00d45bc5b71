package pool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/metrics"
	"github.com/hangar-ci/hangar/pool/store"
)

// PoolView is a pool as `hangar pools` shows it.
type PoolView struct {
	Name          string        `json:"name"`
	Provider      string        `json:"provider"`
	MinIdle       int           `json:"min_idle"`
	MaxInstances  int           `json:"max_instances"`
	Instances     map[State]int `json:"instances"`
	LeasesActive  int           `json:"leases_active"`
	LeasesPending int           `json:"leases_pending"`
	LaunchError   string        `json:"launch_error,omitempty"`
	LaunchBlocked bool          `json:"launch_blocked,omitempty"`
	RetryAt       *time.Time    `json:"launch_retry_at,omitempty"`
	// Image is what the pool launches from when it is a baked image or a
	// copy; ImageCopy, what is being done to bring its image here.
	Image     string `json:"image,omitempty"`
	ImageCopy string `json:"image_copy,omitempty"`
	// Scaled says MinIdle and MaxInstances come from `hangar scale`, not
	// from the config, whose values Config then has.
	Scaled bool        `json:"scaled,omitempty"`
	Config *PoolLimits `json:"config,omitempty"`
	// Autoscale is set for a pool with min_idle = "auto": MinIdle is then
	// its current target, and this says why.
	Autoscale *AutoscaleView `json:"autoscale,omitempty"`
	// CloudNotes are what its provider says an operator should know, such
	// as a filter the cloud refused and the fallback in use (cloud.Noter).
	CloudNotes []string `json:"cloud_notes,omitempty"`
}

// AutoscaleView is an autoscaled pool's current target and its grounds.
type AutoscaleView struct {
	TargetIdle     int     `json:"target_idle"`
	IdleTTDSeconds float64 `json:"idle_ttd_s"`
	RatePerMinute  float64 `json:"rate_per_min"`
	BootSeconds    float64 `json:"boot_s"`
	// Reason is what `hangar pools` shows: "rate 2.1/min, boot 58s".
	Reason        string  `json:"reason"`
	TargetWaitP95 float64 `json:"target_wait_p95_s"`
	MaxIdle       int     `json:"max_idle"`
}

// PoolLimits are a pool's min_idle and max_instances.
type PoolLimits struct {
	MinIdle      int `json:"min_idle"`
	MaxInstances int `json:"max_instances"`
}

// InstanceView is an instance as `hangar instances` shows it.
type InstanceView struct {
	ID         string    `json:"id"`
	Pool       string    `json:"pool"`
	State      State     `json:"state"`
	Since      time.Time `json:"since"`
	Reason     Reason    `json:"reason,omitempty"`
	PrivateIP  string    `json:"private_ip,omitempty"`
	Type       string    `json:"type,omitempty"`
	Zone       string    `json:"zone,omitempty"`
	LeaseID    string    `json:"lease_id,omitempty"`
	Uses       int       `json:"uses"`
	LaunchedAt time.Time `json:"launched_at,omitempty"`
	Image      string    `json:"image,omitempty"`
}

// Pools lists every pool, by name.
func (m *Manager) Pools() []PoolView {
	m.mu.Lock()
	defer m.unlock()
	var out []PoolView
	for _, p := range m.pools {
		out = append(out, m.poolViewLocked(p))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (m *Manager) poolViewLocked(p *poolState) PoolView {
	v := PoolView{Name: p.name, Provider: p.spec.Provider, MinIdle: p.spec.MinIdle, MaxInstances: p.spec.MaxInstances,
		Instances: map[State]int{}, LeasesPending: len(p.queue), LaunchError: p.launchErr, LaunchBlocked: p.blocked,
		Image: p.bakedImage, ImageCopy: p.copyStatus, Scaled: p.scaled}
	if p.scaled {
		config := p.config
		v.Config = &config
	}
	if a := p.auto; a != nil {
		d := a.decision
		v.MinIdle = d.TargetIdle
		v.Autoscale = &AutoscaleView{TargetIdle: d.TargetIdle, IdleTTDSeconds: d.IdleTTD.Seconds(), RatePerMinute: d.Rate * 60,
			BootSeconds: d.Boot.Seconds(), Reason: d.Reason, TargetWaitP95: a.spec.TargetWaitP95.Seconds(), MaxIdle: a.spec.MaxIdle}
	}
	for _, in := range m.instances {
		if in.Pool == p.name && in.State != Gone {
			v.Instances[in.State]++
		}
	}
	for _, l := range m.leases {
		if l.Pool == p.name && l.State == LeaseActive {
			v.LeasesActive++
		}
	}
	if p.launchErr != "" && m.clock.Now().Before(p.retryAt) {
		t := p.retryAt
		v.RetryAt = &t
	}
	if n, ok := cloud.As[cloud.Noter](p.provider); ok {
		v.CloudNotes = n.Notes()
	}
	return v
}

// Scale changes a pool's min_idle and max_instances at run time. The change
// is kept in the store and outlives a restart, overriding the config file
// (which is not touched) until ResetScale.
func (m *Manager) Scale(ctx context.Context, pool string, minIdle, maxInstances *int) (PoolView, error) {
	m.mu.Lock()
	p, ok := m.pools[pool]
	if !ok {
		m.unlock()
		return PoolView{}, m.unknownPool(pool)
	}
	if minIdle != nil && p.auto != nil {
		m.unlock()
		return PoolView{}, fmt.Errorf(`%w: pool %s sizes its spares itself (min_idle = "auto"); scale its max_instances, `+
			`or set its [pools.%s.autoscale] max_idle or a number for min_idle in the config`, ErrInvalid, pool, pool)
	}
	newMin, newMax := p.spec.MinIdle, p.spec.MaxInstances
	if minIdle != nil {
		newMin = *minIdle
	}
	if maxInstances != nil {
		newMax = *maxInstances
	}
	var problems []error
	if newMin < 0 {
		problems = append(problems, errors.New("min_idle must be ≥ 0"))
	}
	// 0 pauses a pool: idle instances go, leased ones when released.
	if newMax < 0 {
		problems = append(problems, errors.New("max_instances must be ≥ 0"))
	}
	if newMax < newMin {
		problems = append(problems, fmt.Errorf("max_instances (%d) must be ≥ min_idle (%d)", newMax, newMin))
	}
	if len(problems) > 0 {
		m.unlock()
		return PoolView{}, fmt.Errorf("%w: %w", ErrInvalid, errors.Join(problems...))
	}
	p.scaled = true
	m.write(store.Op{Kind: store.Pools, ID: pool, Value: scale{newMin, newMax}})
	m.log.Info("pool scaled", "pool", pool, "min_idle", newMin, "max_instances", newMax)
	return m.setLimitsLocked(p, newMin, newMax)
}

// ResetScale drops a pool's run-time limits: the config's apply again.
func (m *Manager) ResetScale(ctx context.Context, pool string) (PoolView, error) {
	m.mu.Lock()
	p, ok := m.pools[pool]
	if !ok {
		m.unlock()
		return PoolView{}, m.unknownPool(pool)
	}
	p.scaled = false
	m.write(store.Op{Kind: store.Pools, ID: pool}) // a nil value deletes
	m.log.Info("pool scale reset to the config", "pool", pool, "min_idle", p.config.MinIdle, "max_instances", p.config.MaxInstances)
	return m.setLimitsLocked(p, p.config.MinIdle, p.config.MaxInstances)
}

// setLimitsLocked applies new limits, commits and unlocks.
func (m *Manager) setLimitsLocked(p *poolState, minIdle, maxInstances int) (PoolView, error) {
	p.spec.MinIdle, p.spec.MaxInstances = minIdle, maxInstances
	// A scaled-up pool may launch again even after a quota error.
	p.blocked = false
	m.timersLocked()
	m.dispatchLocked()
	v := m.poolViewLocked(p)
	saved := m.synced()
	m.unlock()
	return v, saved.Wait()
}

// Instances lists the instances of pool ("" for all), gone ones excluded.
// A caller sees the lease id of its own leases only.
func (m *Manager) Instances(c Caller, pool string) ([]InstanceView, error) {
	m.mu.Lock()
	defer m.unlock()
	if _, ok := m.pools[pool]; pool != "" && !ok {
		return nil, m.unknownPool(pool)
	}
	var out []InstanceView
	for _, in := range m.instances {
		if in.State == Gone || pool != "" && in.Pool != pool {
			continue
		}
		v := InstanceView{ID: in.ID, Pool: in.Pool, State: in.State, Since: in.Since, Reason: in.Reason,
			PrivateIP: in.PrivateIP, Type: in.Type, Zone: in.Zone, Uses: in.Uses, LaunchedAt: in.LaunchedAt, Image: in.Image}
		if l, ok := m.leases[in.LeaseID]; ok && c.sees(l) {
			v.LeaseID = in.LeaseID
		}
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Pool != out[j].Pool {
			return out[i].Pool < out[j].Pool
		}
		return out[i].LaunchedAt.Before(out[j].LaunchedAt)
	})
	return out, nil
}

// Leases lists the leases c sees, of pool and in state ("" for any),
// oldest first. Passwords are left out: a list is for looking, and each
// lease's own GET still gives its holder the password.
func (m *Manager) Leases(c Caller, pool string, state LeaseState) ([]LeaseView, error) {
	switch state {
	case "", LeasePending, LeaseActive, LeaseReleased, LeaseExpired, LeaseCanceled, LeaseLost:
	default:
		return nil, fmt.Errorf("%w: state %q is not one of pending, active, released, expired, canceled, lost", ErrInvalid, state)
	}
	m.mu.Lock()
	defer m.unlock()
	if _, ok := m.pools[pool]; pool != "" && !ok {
		return nil, m.unknownPool(pool)
	}
	out := []LeaseView{}
	for _, l := range m.leases {
		if !c.sees(l) || pool != "" && l.Pool != pool || state != "" && l.State != state {
			continue
		}
		v := m.viewLocked(l)
		v.Worker.Password = ""
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b LeaseView) int {
		if d := a.CreatedAt.Compare(b.CreatedAt); d != 0 {
			return d
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Drain takes an instance out of service: at once when it holds no lease,
// else when its lease ends. Its lease is never cut short.
func (m *Manager) Drain(ctx context.Context, id string) (InstanceView, error) {
	m.mu.Lock()
	in, ok := m.byID[id]
	if !ok || in.State == Gone {
		m.unlock()
		return InstanceView{}, fmt.Errorf("%w %q", ErrUnknownInstance, id)
	}
	switch in.State {
	case Leased:
		m.setState(in, Draining, ReasonDrain)
	case Draining, Terminating:
	default:
		m.terminateLocked(in, ReasonDrain)
	}
	m.dispatchLocked()
	v := InstanceView{ID: in.ID, Pool: in.Pool, State: in.State, Since: in.Since, Reason: in.Reason, PrivateIP: in.PrivateIP, LeaseID: in.LeaseID, Uses: in.Uses}
	saved := m.synced()
	m.unlock()
	return v, saved.Wait()
}

// Console returns what the instance printed to its console.
func (m *Manager) Console(ctx context.Context, id string) ([]byte, error) {
	m.mu.Lock()
	in, ok := m.byID[id]
	var p *poolState
	if ok {
		p = m.pools[in.Pool]
	}
	m.unlock()
	if !ok || p == nil {
		return nil, fmt.Errorf("%w %q", ErrUnknownInstance, id)
	}
	out, err := p.provider.ConsoleOutput(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("reading console of %s: %w", id, err)
	}
	return out, nil
}

// Snapshot is what the metrics gauges read at each scrape.
func (m *Manager) Snapshot() metrics.Snapshot {
	m.mu.Lock()
	defer m.unlock()
	s := metrics.Snapshot{Instances: map[[2]string]int{}, LeasesActive: map[string]int{}, LeasesPending: map[string]int{}, LaunchBlocked: map[string]bool{}, CacheVolumes: map[string]int{},
		OldestPending: map[string]time.Duration{}, LongestInState: map[[2]string]time.Duration{}, ReconciledAt: map[string]time.Time{}}
	now := m.clock.Now()
	for name, p := range m.pools {
		s.OldestPending[name] = 0
		for _, l := range p.queue {
			s.OldestPending[name] = max(s.OldestPending[name], now.Sub(l.CreatedAt))
		}
		s.ReconciledAt[name] = p.reconciledAt
		s.LeasesActive[name] = 0
		if p.spec.Cache != nil {
			s.CacheVolumes[name] = 0
		}
		s.LeasesPending[name] = len(p.queue)
		if p.auto != nil {
			if s.AutoscaleTarget == nil {
				s.AutoscaleTarget = map[string]int{}
			}
			s.AutoscaleTarget[name] = p.auto.decision.TargetIdle
		}
		s.LaunchBlocked[name] = p.blocked
		for st := range transitions {
			if st.live() {
				s.Instances[[2]string{name, string(st)}] = 0
				s.LongestInState[[2]string{name, string(st)}] = 0
			}
		}
	}
	for _, in := range m.instances {
		if in.State != Gone {
			k := [2]string{in.Pool, string(in.State)}
			s.Instances[k]++
			s.LongestInState[k] = max(s.LongestInState[k], now.Sub(in.Since))
		}
		if in.CacheAttached && in.State != Gone {
			s.CacheVolumes[in.Pool]++
		}
	}
	for _, l := range m.leases {
		if l.State == LeaseActive {
			s.LeasesActive[l.Pool]++
		}
	}
	return s
}
