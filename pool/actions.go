package pool

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/pool/store"
)

// cloudCallTimeout bounds one cloud call; a call that times out is retried
// by the next reconcile, never left to hang a goroutine.
const cloudCallTimeout = 2 * time.Minute

// launchLocked writes a launch intent and launches one instance for p in
// the background. The intent is on disk before the cloud is asked, and its
// key is the launch's idempotency token, so a crash at any point can neither
// leak an instance nor launch a second one for the same intent.
func (m *Manager) launchLocked(p *poolState) {
	now := m.clock.Now()
	in := &Instance{
		Key:       "h-" + m.newID(12),
		Pool:      p.name,
		State:     Launching,
		Since:     now,
		IntentAt:  now,
		Password:  randomToken(24), // 192 bits
		LastSeen:  now,
		Image:     p.launchImage(),
		accounted: now,
		op:        OpLaunch,
	}
	in.token = randomToken(32)
	in.TokenHash = bootstrap.HashToken(in.token)
	m.index(in)
	m.saveInstance(in)
	m.notify()
	m.goAsync(func(ctx context.Context) {
		// The intent is committed with the decision that made it, when
		// that decision lets go of the lock; only then can we wait for it.
		m.mu.Lock()
		intent := m.synced()
		m.unlock()
		if err := intent.Wait(); err != nil {
			m.mu.Lock()
			m.launchFailedLocked(p, in, fmt.Errorf("writing launch intent: %w", err))
			m.unlock()
			return
		}
		m.launch(ctx, p, in)
	})
}

func (m *Manager) launch(ctx context.Context, p *poolState, in *Instance) {
	m.mu.Lock()
	if in.State != Launching {
		// Drained before its launch began: no cloud call at all.
		in.op = OpNone
		m.setState(in, Gone, ReasonNone)
		m.unlock()
		return
	}
	token := in.token
	if token == "" {
		// Restarted with an intent whose launch may not have happened:
		// only the token's hash was kept, so the retry gets a new token.
		// The earlier one stays valid in case the launch did happen.
		token = randomToken(32)
		in.EarlierTokenHashes = append(in.EarlierTokenHashes, in.TokenHash)
		in.TokenHash = bootstrap.HashToken(token)
		m.byToken[in.TokenHash] = in
		m.saveInstance(in)
	}
	in.token = ""
	spec := p.spec
	launch := spec.Launch
	// The image chosen with the intent: a retry of the launch must send
	// what the first try sent, or the cloud refuses its client token.
	launch.Image = cmp.Or(in.Image, p.launchImage())
	launch.Tags = m.tags(p, in)
	launch.ClientToken = in.Key
	m.unlock()

	ud, err := spec.userData(p.name, m.opts.PublicURL, token)
	var got []cloud.Instance
	if err == nil {
		launch.UserData = ud
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		got, err = p.provider.Launch(cctx, launch, 1)
		cancel()
	}
	m.mu.Lock()
	defer m.unlock()
	in.op = OpNone
	if err == nil && len(got) == 0 {
		err = errors.New("cloud launched nothing")
	}
	if err != nil {
		if ctx.Err() != nil {
			return // shutting down: the intent is retried at the next start
		}
		m.launchFailedLocked(p, in, err)
		return
	}
	p.launchFailures, p.launchErr, p.blocked = 0, "", false
	m.launchedLocked(in, got[0])
	m.dispatchLocked()
}

// launchedLocked gives the intent in the instance c the cloud started for
// it. Caller holds m.mu.
func (m *Manager) launchedLocked(in *Instance, c cloud.Instance) {
	in.ID, in.PrivateIP, in.Type, in.Zone, in.LaunchedAt = c.ID, c.PrivateIP, c.Type, c.Zone, m.clock.Now()
	m.byID[in.ID] = in
	if in.State == Terminating {
		// Drained while launching: it is to go, now that it has an id.
		m.terminateCall(in)
	} else if !in.ReadyAt.IsZero() && !m.awaitsCache(in) {
		// Its ready report beat the launch call's answer.
		m.setState(in, Idle, ReasonReady)
	} else {
		m.setState(in, Booting, ReasonLaunched)
	}
	m.attachCacheLocked(in)
}

func (m *Manager) tags(p *poolState, in *Instance) map[string]string {
	return m.intentTags(p, in.Key)
}

// intentTags are the tags of a launch for intent (an instance's key, or a
// batch's).
func (m *Manager) intentTags(p *poolState, intent string) map[string]string {
	t := map[string]string{}
	for k, v := range p.spec.Launch.Tags {
		t[k] = v
	}
	t[cloud.TagPool] = p.name
	t[cloud.TagOwner] = m.store.Owner()
	t[cloud.TagIntent] = intent
	return t
}

// launchFailedLocked drops the intent and backs the pool off: exponentially
// with jitter, or until an operator acts when the cloud says a quota is
// reached (a retry storm would not raise the quota).
func (m *Manager) launchFailedLocked(p *poolState, in *Instance, err error) {
	in.op = OpNone
	m.launchBackoffLocked(p, in.Key, err)
	m.setState(in, Gone, ReasonLaunchFailed)
	m.revokeTokens(in)
}

// launchBackoffLocked records a failed launch call of p for intent (an
// instance's key or a batch's) and backs the pool off.
func (m *Manager) launchBackoffLocked(p *poolState, intent string, err error) {
	class := cloud.ErrorClass(err)
	m.log.Warn("launch failed", "pool", p.name, "intent", intent, "class", class, "err", err)
	if m.metrics != nil {
		m.metrics.LaunchErrors.WithLabelValues(p.name, class).Inc()
	}
	p.launchFailures++
	p.launchErr = err.Error()
	m.launchErrorEvent(p.name, intent, p.launchErr)
	if errors.Is(err, cloud.ErrQuota) {
		p.blocked = true
	}
	backoff := time.Second << min(p.launchFailures, 8) // up to 256s
	backoff = backoff/2 + rand.N(backoff/2+1)
	p.retryAt = m.clock.Now().Add(backoff)
}

// startLocked boots a stopped instance again.
func (m *Manager) startLocked(in *Instance) {
	p := m.pools[in.Pool]
	if p == nil || in.op != OpNone {
		return
	}
	m.setState(in, Starting, ReasonNeeded)
	in.op = OpStart
	m.goAsync(func(ctx context.Context) {
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		_, err := p.provider.Start(cctx, []string{in.ID})
		cancel()
		m.mu.Lock()
		defer m.unlock()
		in.op = OpNone
		if in.State != Starting {
			return
		}
		if err != nil {
			m.log.Warn("start failed", "pool", in.Pool, "instance", in.ID, "err", err)
			m.terminateLocked(in, ReasonStartFailed)
		} else {
			in.LaunchedAt = m.clock.Now()
			in.ReadyAt = time.Time{}
			m.setState(in, Booting, ReasonStarted)
		}
		m.dispatchLocked()
	})
}

// stopLocked stops an idle instance, keeping its disk.
func (m *Manager) stopLocked(in *Instance, reason Reason) {
	p := m.pools[in.Pool]
	m.setState(in, Stopping, reason)
	m.reaped(in, reason)
	in.op = OpStop
	m.goAsync(func(ctx context.Context) {
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		_, err := p.provider.Stop(cctx, []string{in.ID})
		cancel()
		m.mu.Lock()
		defer m.unlock()
		in.op = OpNone
		if in.State != Stopping {
			return
		}
		if err != nil {
			m.log.Warn("stop failed; terminating instead", "pool", in.Pool, "instance", in.ID, "err", err)
			m.terminateLocked(in, ReasonStopFailed)
			return
		}
		m.setState(in, Stopped, reason)
		m.dispatchLocked()
	})
}

// terminateLocked ends an instance. Its token dies at once; the cloud call
// runs in the background and is retried by reconcile until it succeeds.
func (m *Manager) terminateLocked(in *Instance, reason Reason) {
	if in.State == Terminating || in.State == Gone {
		return
	}
	if m.savesCache(in, reason) {
		// Its cache first; the snapshot ends it (cache.go).
		m.setState(in, Saving, reason)
		m.reaped(in, reason)
		return
	}
	saved := in.State == Saving
	m.revokeTokens(in)
	if in.State == Launching && in.op != OpLaunch {
		// An intent whose launch never started: nothing to end.
		m.setState(in, Gone, reason)
		return
	}
	// A launch under way ends it when it returns with a cloud id.
	m.setState(in, Terminating, reason)
	if !saved {
		m.reaped(in, reason) // counted when it began saving
	}
	m.terminateCall(in)
}

func (m *Manager) terminateCall(in *Instance) {
	p := m.pools[in.Pool]
	if in.op != OpNone || in.ID == "" || p == nil {
		// A call under way, or no id yet: its launch, or reconcile,
		// finishes the job.
		return
	}
	in.op = OpTerminate
	q := m.terminating[p.provider]
	m.terminating[p.provider] = append(q, in)
	if len(q) == 0 {
		m.goAsync(func(ctx context.Context) { m.terminateBatches(ctx, p.provider) })
	}
}

// terminateBatches ends the instances queued for prov, one call for all of
// them; those queued while a call is under way go in the next one. A reaper
// ending a hundred idle instances makes one call, not a hundred.
func (m *Manager) terminateBatches(ctx context.Context, prov cloud.Provider) {
	m.mu.Lock()
	defer m.unlock()
	for len(m.terminating[prov]) > 0 {
		batch := m.terminating[prov]
		ids := make([]string, len(batch))
		for i, in := range batch {
			ids[i] = in.ID
		}
		m.unlock()
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		done, err := prov.Terminate(cctx, ids)
		cancel()
		m.mu.Lock()
		// Only now: a termination queued meanwhile must not start a second
		// batch goroutine while this one still owns the queue.
		m.terminating[prov] = m.terminating[prov][len(batch):]
		ended := map[string]bool{}
		for _, id := range done {
			ended[id] = true
		}
		if err != nil {
			m.log.Warn("terminate failed; reconcile retries", "instances", len(ids)-len(done), "err", err)
		}
		for _, in := range batch {
			in.op = OpNone
			if ended[in.ID] {
				m.setState(in, Gone, ReasonNone)
			}
		}
		m.dispatchLocked()
	}
	delete(m.terminating, prov)
}

func (m *Manager) reaped(in *Instance, reason Reason) {
	if reason == "" {
		return
	}
	m.reapEvent(in, reason)
	if m.metrics != nil {
		m.metrics.Reaped.WithLabelValues(in.Pool, string(reason)).Inc()
	}
}

// unclaimedTooLong: nobody has fetched l within its pool's claim_timeout
// of its assignment, or of this process's start (a client cut off by a
// crash comes back for its lease when the server is back).
func (m *Manager) unclaimedTooLong(l *Lease, now time.Time) bool {
	p := m.pools[l.Pool]
	if p == nil {
		return false
	}
	since := l.AssignedAt
	if since.Before(m.restoredAt) {
		since = m.restoredAt
	}
	return now.Sub(since) > p.spec.ClaimTimeout
}

// resumeLocked restarts the cloud calls a crash interrupted. Caller holds m.mu.
func (m *Manager) resumeLocked() {
	for _, in := range m.instances {
		p := m.pools[in.Pool]
		if p == nil {
			if in.State != Gone && in.State != Terminating {
				m.log.Warn("instance of a pool no longer configured", "pool", in.Pool, "instance", in.ID)
			}
			continue
		}
		switch in.State {
		case Launching:
			if in.op == OpNone && in.Batch == "" { // a batch's slots: resumeBatchesLocked
				in.op = OpLaunch
				m.goAsync(func(ctx context.Context) { m.launch(ctx, p, in) })
			}
		case Terminating:
			m.terminateCall(in)
		case Stopping:
			m.setState(in, Terminating, ReasonInterruptedStop)
			m.terminateCall(in)
		case Starting:
			m.setState(in, Stopped, ReasonInterruptedStart)
		case Booting, Idle, Leased, Releasing, Draining:
			m.attachCacheLocked(in)
		}
	}
	m.resumeBatchesLocked()
}

// timersLocked acts on what the clock says is due, in named steps. Caller
// holds m.mu.
func (m *Manager) timersLocked() {
	now := m.clock.Now()
	m.leaseTimersLocked(now)
	idle, live := m.instanceTimersLocked(now)
	m.batchTimersLocked(now)
	for _, name := range m.poolNames {
		p := m.pools[name]
		m.autoscaleLocked(p, now)
		m.reapIdleLocked(p, idle[name], live[name], now)
		m.unblockLocked(p, now)
		m.cacheTimerLocked(p, now)
	}
}

// leaseTimersLocked ends leases whose time is up and forgets ended ones
// kept long enough for their holders to read.
func (m *Manager) leaseTimersLocked(now time.Time) {
	for _, l := range m.leases {
		switch {
		case l.State == LeaseActive && now.After(l.ExpiresAt):
			m.endLeaseLocked(l, LeaseExpired, true)
		case l.State == LeaseActive && l.Unclaimed && m.unclaimedTooLong(l, now):
			m.log.Warn("lease never reached its holder; releasing it", "pool", l.Pool, "lease", l.ID)
			m.endLeaseLocked(l, LeaseReleased, false)
		case l.State == LeasePending && now.After(l.ExpiresAt):
			m.endLeaseLocked(l, LeaseCanceled, false)
		case l.State.ended() && now.Sub(l.EndedAt) > m.endedKept:
			m.forgetLeaseLocked(l)
		}
	}
}

func (m *Manager) forgetLeaseLocked(l *Lease) {
	delete(m.leases, l.ID)
	if k := clientKey(l.Pool, l.Owner, l.ClientToken); l.ClientToken != "" && m.byClient[k] == l {
		delete(m.byClient, k)
	}
	m.write(store.Op{Kind: store.Leases, ID: l.ID})
}

// instanceTimersLocked accounts every instance's time, forgets gone ones
// kept long enough, ends those that overstayed booting or releasing or
// whose pool is gone, and returns each pool's idle instances and its count
// of live ones.
func (m *Manager) instanceTimersLocked(now time.Time) (idle map[string][]*Instance, live map[string]int) {
	idle, live = map[string][]*Instance{}, map[string]int{}
	for _, in := range m.instances {
		m.account(in, now)
		p := m.pools[in.Pool]
		if in.State.live() {
			live[in.Pool]++
		}
		switch {
		case in.State == Gone:
			if now.Sub(in.Since) > m.endedKept {
				delete(m.instances, in.Key)
				if p != nil {
					p.count[Gone]--
				}
				delete(m.byID, in.ID)
				m.write(store.Op{Kind: store.Instances, ID: in.Key})
			}
		case p == nil:
			if in.State == Idle || in.State == Stopped || in.State == Booting {
				m.terminateLocked(in, ReasonPoolRemoved)
			}
		case in.State == Booting && now.Sub(in.Since) > p.spec.BootTimeout:
			m.log.Warn("instance did not report ready in time", "pool", in.Pool, "instance", in.ID, "boot_timeout", p.spec.BootTimeout)
			m.terminateLocked(in, ReasonBootTimeout)
		case in.State == Releasing && now.Sub(in.Since) > releaseTimeout:
			m.terminateLocked(in, ReasonReleaseTimeout)
		case in.State == Saving && in.op == OpNone && now.Sub(in.Since) > cacheTimeout:
			m.log.Warn("instance never flushed its cache; ending it without a snapshot", "pool", in.Pool, "instance", in.ID)
			if m.metrics != nil {
				m.metrics.CacheSnapshots.WithLabelValues(in.Pool, "failed").Inc()
			}
			m.terminateLocked(in, ReasonCacheTimeout)
		case in.State == Idle && in.refresh != nil:
			// Not reaped while its cache is snapshotted; asked in vain
			// for too long, it goes back to work.
			if in.op == OpNone && now.Sub(in.refresh.asked) > cacheTimeout {
				m.log.Warn("instance never flushed its cache for a refresh", "pool", in.Pool, "instance", in.ID)
				m.endRefreshLocked(in, fmt.Errorf("instance %s did not flush its cache within %s", in.name(), cacheTimeout))
				m.wakeInstance(in)
			}
		case in.State == Idle:
			idle[in.Pool] = append(idle[in.Pool], in)
		}
	}
	return idle, live
}

// reapIdleLocked ends p's idle instances above max_instances (after a
// scale-in) and, oldest first, those idle past idle_ttd above min_idle
// (an autoscaled pool's own target and TTD: autoscaler.go).
// Only idle ones: scale-in never takes a busy worker.
func (m *Manager) reapIdleLocked(p *poolState, idle []*Instance, live int, now time.Time) {
	bySince(idle, false) // oldest first
	remaining := len(idle)
	over := live - p.spec.MaxInstances
	for _, in := range idle {
		switch {
		case over > 0:
			m.terminateLocked(in, ReasonScaleIn)
			over--
		case remaining > p.minIdle() && now.Sub(in.Since) > p.idleTTD():
			if p.spec.StopWhenIdle && p.provider.Capabilities().StopStart {
				m.stopLocked(in, ReasonIdleTTD)
			} else {
				m.terminateLocked(in, ReasonIdleTTD)
			}
		default:
			continue
		}
		remaining--
	}
}

// unblockLocked lets a pool stopped by a quota error try again now and
// then: quotas do get raised, and a storm of retries would not help.
func (m *Manager) unblockLocked(p *poolState, now time.Time) {
	if p.blocked && now.After(p.retryAt.Add(5*time.Minute)) {
		p.blocked = false
	}
}
