package pool

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// Build caches on volumes (docs/design.md, "Cache volumes").
//
// Each instance of a pool with a cache gets a volume of its own, made from
// the cache's newest completed snapshot (blank the first time), created
// once the cloud has given the instance a zone and attached as
// cacheDevice; the bootstrap waits for it, mounts it and only then reports
// ready. When an instance that served a lease ends for a reason that
// leaves its disk sound (discard, TTD, max_uses, drain, scale-in), it first
// goes to Saving: the bootstrap stops the worker and flushes the cache
// (AssignSaveCache), says so in its next poll, and the volume is
// snapshotted before the instance is terminated. Snapshots are only ever
// added and then pruned beyond keep, oldest first, so a failed or cut
// snapshot never costs the previous one. Volumes carry the owner, cache
// and intent tags; reconcile deletes those whose instance is gone, which
// covers crashes at any point (sweepCacheVolumes).

// cacheDevice is where the cache volume is attached (/dev/xvdf on Xen,
// an NVMe namespace on Nitro, $HANGAR_ROOT/dev/sdf on the local cloud).
const cacheDevice = "/dev/sdf"

// TagCache names the cache a volume or snapshot belongs to;
// TagCacheInstance, on a snapshot, the instance whose cache it is.
const (
	TagCache         = "hangar:cache"
	TagCacheInstance = "hangar:instance"
)

// cacheTimeout bounds making and attaching a cache volume, and an
// instance's flushing its cache when asked to.
const cacheTimeout = 5 * time.Minute

// cacheTags are the tags of p's cache volumes and snapshots.
func (m *Manager) cacheTags(p *poolState) map[string]string {
	return map[string]string{cloud.TagOwner: m.store.Owner(), cloud.TagPool: p.name, TagCache: p.spec.Cache.Name}
}

// storageOf is p's provider's storage, when p has a cache.
func storageOf(p *poolState) (cloud.Storage, bool) {
	if p == nil || p.spec.Cache == nil {
		return nil, false
	}
	return cloud.StorageOf(p.provider)
}

// attachCacheLocked makes and attaches in's cache volume in the background
// once it has a cloud id; a crash is resumed by resumeLocked.
func (m *Manager) attachCacheLocked(in *Instance) {
	p := m.pools[in.Pool]
	st, ok := storageOf(p)
	if !ok || in.CacheAttached || in.ID == "" || in.op != OpNone {
		return
	}
	in.op = OpCache
	spec := cloud.VolumeSpec{Zone: in.Zone, SizeGB: p.spec.Cache.SizeGB, Tags: m.cacheTags(p), ClientToken: in.Key + "-cache"}
	spec.Tags[cloud.TagIntent] = in.Key
	id, volume := in.ID, in.CacheVolume
	m.goAsync(func(ctx context.Context) {
		cctx, cancel := context.WithTimeout(ctx, cacheTimeout)
		err := m.attachCache(cctx, st, p, spec, id, &volume)
		cancel()
		m.mu.Lock()
		defer m.unlock()
		in.op = OpNone
		if volume != in.CacheVolume {
			in.CacheVolume = volume
			m.saveInstance(in)
		}
		switch {
		case ctx.Err() != nil:
			return // shutting down: resumed at the next start
		case in.State == Terminating:
			m.terminateCall(in)
		case err != nil:
			m.log.Warn("cache volume failed; ending the instance", "pool", in.Pool, "instance", in.ID, "err", err)
			p.launchErr = err.Error()
			m.launchErrorEvent(p.name, in.name(), p.launchErr)
			m.terminateLocked(in, ReasonCacheFailed)
		default:
			in.CacheAttached = true
			m.saveInstance(in)
			if in.State == Booting && !in.ReadyAt.IsZero() {
				// It said ready before its cache was there (a bootstrap
				// that does not wait for it): ready now.
				m.setState(in, Idle, ReasonReady)
			}
		}
		m.dispatchLocked()
	})
}

// attachCache creates the volume (unless *volume names it already), waits
// for it to be available and attaches it to instance id, waiting for the
// instance to run.
func (m *Manager) attachCache(ctx context.Context, st cloud.Storage, p *poolState, spec cloud.VolumeSpec, id string, volume *string) error {
	if *volume == "" {
		snap, err := currentSnapshot(ctx, st, m.cacheTags(p))
		if err != nil {
			return fmt.Errorf("finding the cache's snapshot: %w", err)
		}
		if snap != nil {
			spec.SnapshotID = snap.ID
			spec.SizeGB = max(spec.SizeGB, snap.SizeGB)
		}
		v, err := st.CreateVolume(ctx, spec)
		if err != nil {
			return fmt.Errorf("creating the cache volume: %w", err)
		}
		*volume = v.ID
		m.log.Info("cache volume created", "pool", p.name, "instance", id, "volume", v.ID, "snapshot", spec.SnapshotID)
	}
	wait := time.Second
	for {
		vs, err := st.Volumes(ctx, cloud.Filter{IDs: []string{*volume}})
		switch {
		case err != nil:
			// Retried below: a listing may lag a creation.
		case len(vs) == 1 && vs[0].InstanceID == id:
			return nil // attached before a restart
		case len(vs) == 1 && vs[0].State == cloud.VolumeAvailable:
			if _, err = st.AttachVolume(ctx, *volume, id, cacheDevice); err == nil {
				return nil
			}
			// The instance may not run yet: EC2 attaches only then.
		case len(vs) == 1 && vs[0].State == cloud.VolumeError:
			return fmt.Errorf("cache volume %s failed", *volume)
		}
		t := m.clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			if err == nil {
				err = ctx.Err()
			}
			return fmt.Errorf("attaching cache volume %s to %s: %w", *volume, id, err)
		case <-t.C():
		}
		wait = min(2*wait, 15*time.Second)
	}
}

// currentSnapshot is the newest completed snapshot with tags, or nil.
func currentSnapshot(ctx context.Context, st cloud.Storage, tags map[string]string) (*cloud.Snapshot, error) {
	snaps, err := cacheSnapshots(ctx, st, tags)
	if err != nil || len(snaps) == 0 {
		return nil, err
	}
	return &snaps[0], nil
}

// cacheSnapshots lists a cache's completed snapshots, newest first.
func cacheSnapshots(ctx context.Context, st cloud.Storage, tags map[string]string) ([]cloud.Snapshot, error) {
	all, err := st.Snapshots(ctx, cloud.Filter{Tags: tags})
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(newestFirst(all), func(s cloud.Snapshot) bool { return s.State != cloud.SnapshotCompleted }), nil
}

// newestFirst sorts snapshots newest first; completed ones before the
// others, so that a snapshot's index among the completed is its index.
func newestFirst(snaps []cloud.Snapshot) []cloud.Snapshot {
	slices.SortFunc(snaps, func(a, b cloud.Snapshot) int {
		return cmp.Or(
			cmp.Compare(stateRank(a.State), stateRank(b.State)),
			b.StartedAt.Compare(a.StartedAt),
			cmp.Compare(b.ID, a.ID))
	})
	return snaps
}

func stateRank(state string) int {
	if state == cloud.SnapshotCompleted {
		return 0
	}
	return 1
}

// awaitsCache: in's pool has a cache and in's volume is not attached yet,
// so in is not ready for a lease whatever its bootstrap says.
func (m *Manager) awaitsCache(in *Instance) bool {
	_, ok := storageOf(m.pools[in.Pool])
	return ok && !in.CacheAttached
}

// savesCache says whether in, ending for reason, is to have its cache
// snapshotted first: it served a lease, its volume is attached and its
// disk is sound. An instance lost, expired mid-build or never ready is
// not asked; its volume is just deleted.
func (m *Manager) savesCache(in *Instance, reason Reason) bool {
	if _, ok := storageOf(m.pools[in.Pool]); !ok || !in.CacheAttached || in.Uses == 0 {
		return false
	}
	switch in.State {
	case Idle, Leased, Releasing, Draining:
	default:
		return false
	}
	switch reason {
	case ReasonDiscard, ReasonIdleTTD, ReasonMaxUses, ReasonDrain, ReasonScaleIn:
		return true
	}
	return false
}

// cacheRefresh is a snapshot asked of a live, idle instance's cache (in
// memory only: a restart forgets it, and the refresh timer asks again).
type cacheRefresh struct {
	asked time.Time
	done  chan struct{} // closed when it has ended, with snap or err
	snap  cloud.Snapshot
	err   error
}

// endRefreshLocked ends in's refresh, if any, with err.
func (m *Manager) endRefreshLocked(in *Instance, err error) {
	if r := in.refresh; r != nil {
		r.err = err
		close(r.done)
		in.refresh = nil
		if err != nil && m.metrics != nil {
			m.metrics.CacheSnapshots.WithLabelValues(in.Pool, "failed").Inc()
		}
	}
}

// snapshotCacheLocked snapshots in's cache volume in the background, once
// its bootstrap has flushed it: a Saving instance then ends whatever came
// of it; an idle one asked for a refresh goes back to work.
func (m *Manager) snapshotCacheLocked(in *Instance) {
	p := m.pools[in.Pool]
	st, ok := storageOf(p)
	if !ok || in.op != OpNone || in.State != Saving && in.refresh == nil {
		return
	}
	in.op = OpSnapshot
	volume, id := in.CacheVolume, in.ID
	tags := m.cacheTags(p)
	tags[TagCacheInstance] = id
	m.goAsync(func(ctx context.Context) {
		start := m.clock.Now()
		cctx, cancel := context.WithTimeout(ctx, cacheTimeout)
		snap, err := st.CreateSnapshot(cctx, volume, fmt.Sprintf("hangar cache %s of pool %s, from %s", p.spec.Cache.Name, p.name, id), tags)
		cancel()
		took := m.clock.Now().Sub(start)
		m.mu.Lock()
		defer m.unlock()
		in.op = OpNone
		if ctx.Err() != nil {
			return // shutting down: the instance asks again after the restart
		}
		m.cacheSnapshotted(p, in, snap, err, took)
		if r := in.refresh; r != nil {
			r.snap, r.err = snap, err
			close(r.done)
			in.refresh = nil
			m.wakeInstance(in)
		}
		if in.State == Saving {
			m.terminateLocked(in, ReasonCacheSaved)
		}
		m.dispatchLocked()
	})
}

// cacheSnapshotted records a snapshot's outcome: logs, metrics, the
// refresh clock, and the pruning a new snapshot makes due.
func (m *Manager) cacheSnapshotted(p *poolState, in *Instance, snap cloud.Snapshot, err error, took time.Duration) {
	if err != nil {
		m.log.Warn("cache snapshot failed; the previous one stays current", "pool", p.name, "instance", in.ID, "volume", in.CacheVolume, "err", err)
	} else {
		m.log.Info("cache snapshotted", "pool", p.name, "instance", in.ID, "volume", in.CacheVolume, "snapshot", snap.ID, "took", took)
		p.cacheSavedAt = m.clock.Now()
		in.cacheSnapUses = in.Uses
		m.goAsync(func(ctx context.Context) { m.pruneCache(ctx, p) })
	}
	if m.metrics != nil {
		m.metrics.CacheSnapshots.WithLabelValues(p.name, outcome(err)).Inc()
		if err == nil {
			m.metrics.CacheSnapshotSeconds.WithLabelValues(p.name).Observe(took.Seconds())
			m.metrics.CacheSnapshotBytes.WithLabelValues(p.name).Set(float64(snap.SizeGB) * (1 << 30))
		}
	}
}

// cacheTimerLocked refreshes p's cache when its newest snapshot is older
// than the cache's refresh.
func (m *Manager) cacheTimerLocked(p *poolState, now time.Time) {
	if c := p.spec.Cache; c == nil || c.Refresh <= 0 || now.Sub(p.cacheSavedAt) < c.Refresh {
		return
	}
	// The next try after another period, whatever comes of this one (no
	// instance to take it from, a failure); a snapshot resets the clock.
	p.cacheSavedAt = now
	m.refreshCacheLocked(p, true)
}

// refreshCacheLocked asks the most recently used idle instance of p that
// has served a lease (with onlyChanged, one since its cache was last
// snapshotted) to have its cache snapshotted, and returns the refresh; nil
// when no instance can. One at a time: a refresh under way is returned
// again.
func (m *Manager) refreshCacheLocked(p *poolState, onlyChanged bool) *cacheRefresh {
	var best *Instance
	for _, in := range m.instances {
		if in.Pool != p.name || in.State != Idle || !in.CacheAttached || in.Uses == 0 || onlyChanged && in.Uses == in.cacheSnapUses {
			continue
		}
		if in.refresh != nil {
			return in.refresh
		}
		if in.op == OpNone && (best == nil || in.Since.After(best.Since)) {
			best = in
		}
	}
	if best == nil {
		return nil
	}
	best.refresh = &cacheRefresh{asked: m.clock.Now(), done: make(chan struct{})}
	m.log.Info("refreshing the cache from an idle instance", "pool", p.name, "instance", best.ID)
	m.wakeInstance(best)
	return best.refresh
}

func outcome(err error) string {
	if err != nil {
		return "failed"
	}
	return "ok"
}

// pruneCache deletes p's completed snapshots beyond keep, oldest first,
// and those that failed. The newest completed one is never deleted.
func (m *Manager) pruneCache(ctx context.Context, p *poolState) {
	st, ok := storageOf(p)
	if !ok {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
	defer cancel()
	all, err := st.Snapshots(cctx, cloud.Filter{Tags: m.cacheTags(p)})
	if err != nil {
		m.log.Warn("listing cache snapshots to prune", "pool", p.name, "err", err)
		return
	}
	var drop []string
	for i, s := range newestFirst(all) {
		if s.State == cloud.SnapshotError || s.State == cloud.SnapshotCompleted && i >= max(p.spec.Cache.Keep, 1) {
			drop = append(drop, s.ID)
		}
	}
	for _, id := range drop {
		if err := st.DeleteSnapshot(cctx, id); err != nil {
			m.log.Warn("deleting an old cache snapshot", "pool", p.name, "snapshot", id, "err", err)
			continue
		}
		m.log.Info("old cache snapshot deleted", "pool", p.name, "snapshot", id)
	}
}

// sweepCacheVolumes deletes the cache volumes of prov that no instance
// needs: attached to nothing, and of an instance gone, or unknown for
// longer than orphan_grace (its record may be on its way, as for an
// orphan instance). One listing a reconcile cycle, filtered by the owner
// tag.
func (m *Manager) sweepCacheVolumes(ctx context.Context, prov cloud.Provider) {
	st, ok := cloud.StorageOf(prov)
	if !ok {
		return
	}
	m.mu.Lock()
	caches := false
	for _, p := range m.pools {
		caches = caches || (p.provider == prov && p.spec.Cache != nil)
	}
	m.unlock()
	if !caches {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, cloudCallTimeout)
	defer cancel()
	vols, err := st.Volumes(cctx, cloud.Filter{Tags: map[string]string{cloud.TagOwner: m.store.Owner()}})
	if err != nil {
		m.log.Warn("listing cache volumes", "err", err)
		return
	}
	now := m.clock.Now()
	var drop []cloud.Volume
	m.mu.Lock()
	listed := map[string]bool{}
	for _, v := range vols {
		if v.Tags[TagCache] == "" || v.State != cloud.VolumeAvailable || v.InstanceID != "" {
			continue
		}
		listed[v.ID] = true
		in := m.instances[v.Tags[cloud.TagIntent]]
		switch {
		case in != nil && in.State != Gone && in.CacheVolume == v.ID:
			// Its instance's: attached soon, or kept until it ends.
			delete(m.strayVolumes, v.ID)
		case in != nil && in.State == Gone && in.CacheVolume == v.ID:
			drop = append(drop, v)
		default:
			first, seen := m.strayVolumes[v.ID]
			if !seen {
				m.strayVolumes[v.ID] = now
			} else if now.Sub(first) > m.opts.OrphanGrace {
				drop = append(drop, v)
			}
		}
	}
	for id := range m.strayVolumes {
		if !listed[id] {
			delete(m.strayVolumes, id)
		}
	}
	m.unlock()
	for _, v := range drop {
		if err := st.DeleteVolume(cctx, v.ID); err != nil && !errors.Is(err, cloud.ErrNotFound) {
			m.log.Warn("deleting a cache volume", "volume", v.ID, "err", err)
			continue
		}
		m.log.Info("cache volume deleted", "volume", v.ID, "instance", v.Tags[cloud.TagIntent])
		m.mu.Lock()
		delete(m.strayVolumes, v.ID)
		m.unlock()
	}
}

// ErrNoCache: the pool has no cache, or nothing to take a snapshot from.
var ErrNoCache = errors.New("no cache")

// CacheSnapshotView is one snapshot of a pool's cache.
type CacheSnapshotView struct {
	ID        string    `json:"id"`
	State     string    `json:"state"`
	CreatedAt time.Time `json:"created_at"`
	SizeGB    int       `json:"size_gb"`
	// Instance is the instance whose cache it is.
	Instance string `json:"instance,omitempty"`
	// Current: new instances start from it (the newest completed one).
	Current bool `json:"current"`
}

// cacheListing lists the snapshots of pool's cache, with its storage.
func (m *Manager) cacheListing(ctx context.Context, pool string) (cloud.Storage, []cloud.Snapshot, error) {
	m.mu.Lock()
	p := m.pools[pool]
	m.unlock()
	if p == nil {
		return nil, nil, m.unknownPool(pool)
	}
	st, ok := storageOf(p)
	if !ok {
		return nil, nil, fmt.Errorf("%w: pool %s has no [cache]", ErrNoCache, pool)
	}
	all, err := st.Snapshots(ctx, cloud.Filter{Tags: m.cacheTags(p)})
	if err != nil {
		return nil, nil, fmt.Errorf("listing the snapshots of pool %s's cache: %w", pool, err)
	}
	return st, all, nil
}

func cacheSnapshotView(s cloud.Snapshot, current bool) CacheSnapshotView {
	return CacheSnapshotView{ID: s.ID, State: s.State, CreatedAt: s.StartedAt, SizeGB: s.SizeGB, Instance: s.Tags[TagCacheInstance], Current: current}
}

// CacheSnapshots lists the snapshots of pool's cache, newest first.
func (m *Manager) CacheSnapshots(ctx context.Context, pool string) ([]CacheSnapshotView, error) {
	_, all, err := m.cacheListing(ctx, pool)
	if err != nil {
		return nil, err
	}
	out := []CacheSnapshotView{}
	for i, s := range newestFirst(all) {
		out = append(out, cacheSnapshotView(s, i == 0 && s.State == cloud.SnapshotCompleted))
	}
	return out, nil
}

// SnapshotCache snapshots pool's cache now, from its most recently used
// idle instance, without stopping it, and returns the snapshot once taken.
func (m *Manager) SnapshotCache(ctx context.Context, pool string) (CacheSnapshotView, error) {
	m.mu.Lock()
	p := m.pools[pool]
	var r *cacheRefresh
	if p != nil && p.spec.Cache != nil {
		r = m.refreshCacheLocked(p, false)
	}
	m.unlock()
	switch {
	case p == nil:
		return CacheSnapshotView{}, m.unknownPool(pool)
	case p.spec.Cache == nil:
		return CacheSnapshotView{}, fmt.Errorf("%w: pool %s has no [cache]", ErrNoCache, pool)
	}
	if r == nil {
		return CacheSnapshotView{}, fmt.Errorf("%w: no idle instance of pool %s has served a lease since it started; its cache is snapshotted when such an instance ends", ErrNoCache, pool)
	}
	select {
	case <-ctx.Done():
		return CacheSnapshotView{}, fmt.Errorf("waiting for the snapshot of pool %s's cache: %w", pool, ctx.Err())
	case <-r.done:
	}
	if r.err != nil {
		return CacheSnapshotView{}, fmt.Errorf("snapshotting pool %s's cache: %w", pool, r.err)
	}
	return cacheSnapshotView(r.snap, r.snap.State == cloud.SnapshotCompleted), nil
}

// DropCache deletes every snapshot of pool's cache: the next instance
// starts blank. Instances running keep their volumes. It returns the ids
// deleted.
func (m *Manager) DropCache(ctx context.Context, pool string) ([]string, error) {
	st, all, err := m.cacheListing(ctx, pool)
	if err != nil {
		return nil, err
	}
	dropped := []string{}
	var errs []error
	for _, s := range all {
		if err := st.DeleteSnapshot(ctx, s.ID); err != nil {
			errs = append(errs, fmt.Errorf("deleting snapshot %s: %w", s.ID, err))
			continue
		}
		dropped = append(dropped, s.ID)
	}
	m.log.Info("cache dropped", "pool", pool, "snapshots", dropped)
	return dropped, errors.Join(errs...)
}
