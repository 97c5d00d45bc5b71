package pool

import (
	"context"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// listGrace is how long a launched instance may be missing from the cloud's
// listing before it is thought gone: listings are eventually consistent.
const listGrace = 2 * time.Minute

// haltingGrace is how long the cloud may report an instance as terminating
// (EC2's shutting-down) before its terminate is issued again: a terminate
// cut off by a crash, on a cloud that only finishes what it is asked to.
const haltingGrace = time.Minute

// seenSince is when reconcile first saw something about an instance of prov.
type seenSince struct {
	prov cloud.Provider
	at   time.Time
}

// forgetUnlisted drops seen's entries of prov that list no longer shows.
func forgetUnlisted(seen map[string]seenSince, prov cloud.Provider, listed map[string]bool) {
	for id, s := range seen {
		if s.prov == prov && !listed[id] {
			delete(seen, id)
		}
	}
}

// reconcile compares the store with what each cloud says it runs: one
// listing per provider, filtered by this store's owner tag, whatever the
// number of pools and instances.
func (m *Manager) reconcile(ctx context.Context) {
	m.resolveBakedImages(ctx, false)
	m.mu.Lock()
	byProvider := map[cloud.Provider]bool{}
	for _, p := range m.pools {
		byProvider[p.provider] = true
	}
	owner := m.store.Owner()
	m.unlock()
	for prov := range byProvider {
		listedAt := m.clock.Now()
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		list, err := prov.List(cctx, map[string]string{cloud.TagOwner: owner})
		cancel()
		if err != nil {
			m.log.Warn("listing instances for reconcile", "err", err)
			continue
		}
		m.mu.Lock()
		m.reconcileLocked(prov, list, listedAt)
		for _, p := range m.pools {
			if p.provider == prov {
				p.reconciledAt = listedAt
			}
		}
		m.dispatchLocked()
		m.unlock()
		m.sweepCacheVolumes(ctx, prov)
	}
}

// listedAt is when the listing was asked for: what changed since then is
// newer than the listing and is not judged by it.
func (m *Manager) reconcileLocked(prov cloud.Provider, list []cloud.Instance, listedAt time.Time) {
	now := m.clock.Now()
	seen := map[string]bool{}
	orphans, halting := map[string]bool{}, map[string]bool{}
	defer forgetUnlisted(m.orphans, prov, orphans)
	defer forgetUnlisted(m.halting, prov, halting)
	for _, c := range list {
		if c.State == cloud.StateTerminating {
			halting[c.ID] = true
			m.haltingLocked(prov, c, now)
		}
		in := m.instances[c.Tags[cloud.TagIntent]]
		gone := c.State == cloud.StateTerminated || c.State == cloud.StateTerminating
		var batch *Batch
		if in == nil {
			// Tagged with a batch's key: its slot, or a free one.
			var wait bool
			in, batch, wait = m.batchOfLocked(c)
			if wait {
				continue // the batch's call is under way; its answer names it
			}
			if in == nil && batch == nil {
				// Its intent is unknown (a torn store lost its batch)
				// but not the instance: a record names its id.
				in = m.byID[c.ID]
			}
			if batch != nil && in == nil && !gone {
				// More instances than the batch has slots: the
				// cloud ignored the idempotency token.
				orphans[c.ID] = true
				m.orphanLocked(prov, c, now.Add(-m.opts.OrphanGrace))
				continue
			}
		}
		if in == nil || m.pools[in.Pool] == nil || m.pools[in.Pool].provider != prov {
			if !gone {
				orphans[c.ID] = true
				m.orphanLocked(prov, c, now)
			}
			continue
		}
		seen[in.Key] = true
		if in.ID == "" && in.op == OpNone {
			// Launched before a crash cut the launch call's answer off.
			in.ID, in.PrivateIP, in.Type, in.Zone, in.LaunchedAt = c.ID, c.PrivateIP, c.Type, c.Zone, c.LaunchedAt
			m.byID[in.ID] = in
			if in.State == Launching {
				m.setState(in, Booting, ReasonAdopted)
			}
			m.saveInstance(in)
			if batch != nil {
				m.adoptedLocked(batch)
			}
		}
		if in.ID == "" {
			// Its launch call is under way; the answer will name it.
			continue
		}
		if in.ID != c.ID {
			// A second instance for one intent: the cloud ignored the
			// idempotency token. Keep the first, end this one.
			if !gone {
				orphans[c.ID] = true
				m.orphanLocked(prov, c, now.Add(-m.opts.OrphanGrace))
			}
			continue
		}
		delete(m.orphans, c.ID)
		if in.Since.After(listedAt) {
			continue
		}
		switch {
		case in.State == Gone && !gone:
			m.terminateIDs(prov, in.Pool, []string{c.ID}, ReasonRetry)
		case in.State == Terminating:
			// Gone only once the cloud says terminated: while it says
			// terminating, the machine may still run (a crash cut its
			// terminate short), counts against max_instances, and gets
			// its terminate again.
			if c.State == cloud.StateTerminated {
				m.setState(in, Gone, ReasonNone)
			} else {
				m.terminateCall(in)
			}
		case gone && in.State != Gone:
			m.lostLocked(in, ReasonVanished)
		case c.State == cloud.StateStopped && in.op == OpNone && in.State != Stopped:
			m.lostLocked(in, ReasonStoppedOutside)
		}
	}
	for _, in := range m.instances {
		p := m.pools[in.Pool]
		if seen[in.Key] || p == nil || p.provider != prov || in.op != OpNone || in.Since.After(listedAt) {
			continue
		}
		switch in.State {
		case Gone, Launching:
			// Launching ones are resumed with their idempotency token.
		case Terminating:
			m.setState(in, Gone, ReasonNone)
		default:
			if now.Sub(in.LaunchedAt) > listGrace {
				m.lostLocked(in, ReasonVanished)
			}
		}
	}
}

// lostLocked handles an instance that died outside Hangar's hands.
func (m *Manager) lostLocked(in *Instance, reason Reason) {
	m.log.Warn("instance lost", "pool", in.Pool, "instance", in.ID, "reason", reason)
	l, ok := m.leases[in.LeaseID]
	// Terminate first, so the reason recorded is why it was lost.
	m.terminateLocked(in, reason)
	if ok && l.State == LeaseActive {
		m.endLeaseLocked(l, LeaseLost, true)
	}
}

// orphanLocked terminates an owned instance nobody knows once it has been
// seen for longer than orphan_grace: long enough for a launch whose intent
// is being written, or a second server on a copied store, to claim it.
func (m *Manager) orphanLocked(prov cloud.Provider, c cloud.Instance, now time.Time) {
	first, ok := m.orphans[c.ID]
	if !ok {
		m.orphans[c.ID] = seenSince{prov, now}
		m.log.Warn("unknown instance with our owner tag", "instance", c.ID, "pool", c.Tags[cloud.TagPool])
		return
	}
	if m.clock.Now().Sub(first.at) < m.opts.OrphanGrace {
		return
	}
	delete(m.orphans, c.ID)
	m.terminateIDs(prov, c.Tags[cloud.TagPool], []string{c.ID}, ReasonOrphan)
}

// haltingLocked issues the terminate of an instance again when the cloud
// has said it is terminating for longer than haltingGrace: the call that
// began it may have been cut off (on the local cloud, by a crash of this
// process), and only a second one finishes the job.
func (m *Manager) haltingLocked(prov cloud.Provider, c cloud.Instance, now time.Time) {
	first, ok := m.halting[c.ID]
	if !ok {
		m.halting[c.ID] = seenSince{prov, now}
		return
	}
	if now.Sub(first.at) <= haltingGrace {
		return
	}
	m.halting[c.ID] = seenSince{prov, now} // next try after another grace
	m.log.Warn("instance stuck terminating; terminating it again", "instance", c.ID, "since", first.at)
	m.terminateIDs(prov, c.Tags[cloud.TagPool], []string{c.ID}, ReasonStuckTerminating)
}

func (m *Manager) terminateIDs(prov cloud.Provider, pool string, ids []string, reason Reason) {
	if m.metrics != nil {
		m.metrics.Reaped.WithLabelValues(pool, string(reason)).Add(float64(len(ids)))
	}
	m.log.Info("terminating instances", "pool", pool, "instances", ids, "reason", reason)
	m.goAsync(func(ctx context.Context) {
		cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
		defer cancel()
		if _, err := prov.Terminate(cctx, ids); err != nil {
			m.log.Warn("terminate failed; reconcile retries", "instances", ids, "err", err)
		}
	})
}
