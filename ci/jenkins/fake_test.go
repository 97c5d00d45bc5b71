package jenkins

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hangar-ci/hangar/pool"
)

// fakeLeaser keeps leases the way the pool manager does as far as a watcher
// can tell: pending until the test activates them, idempotent by client
// token, renewed by TTL, ended by Release. The cmd/hangar tests run the
// watcher against the real manager.
type fakeLeaser struct {
	mu       sync.Mutex
	pool     string
	max      int
	ttl      time.Duration
	now      func() time.Time
	leases   map[string]*fakeLease
	byToken  map[string]string
	requests int // calls of Lease that made a lease
	renewals int
}

type fakeLease struct {
	req     pool.LeaseRequest
	view    pool.LeaseView
	discard bool
}

func newFakeLeaser(poolName string, max int, now func() time.Time) *fakeLeaser {
	return &fakeLeaser{pool: poolName, max: max, ttl: time.Hour, now: now, leases: map[string]*fakeLease{}, byToken: map[string]string{}}
}

func (f *fakeLeaser) Lease(ctx context.Context, r pool.LeaseRequest) (pool.LeaseView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.Pool != f.pool {
		return pool.LeaseView{}, fmt.Errorf("%w %q", pool.ErrUnknownPool, r.Pool)
	}
	if id, ok := f.byToken[r.ClientToken]; ok && r.ClientToken != "" {
		return f.leases[id].view, nil
	}
	f.requests++
	id := fmt.Sprintf("l-%d", f.requests)
	f.leases[id] = &fakeLease{req: r, view: pool.LeaseView{ID: id, Pool: r.Pool, State: pool.LeasePending, Worker: r.Worker, Labels: r.Labels}}
	f.byToken[r.ClientToken] = id
	return f.leases[id].view, nil
}

func (f *fakeLeaser) GetLease(ctx context.Context, id string, wait time.Duration) (pool.LeaseView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.leases[id]
	if !ok {
		return pool.LeaseView{}, fmt.Errorf("%w %q", pool.ErrUnknownLease, id)
	}
	return l.view, nil
}

func (f *fakeLeaser) Renew(ctx context.Context, id string) (pool.LeaseView, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.leases[id]
	if !ok {
		return pool.LeaseView{}, fmt.Errorf("%w %q", pool.ErrUnknownLease, id)
	}
	if l.view.State != pool.LeaseActive && l.view.State != pool.LeasePending {
		return pool.LeaseView{}, fmt.Errorf("%w: %s is %s", pool.ErrLeaseEnded, id, l.view.State)
	}
	l.view.ExpiresAt = f.now().Add(f.ttl)
	f.renewals++
	return l.view, nil
}

func (f *fakeLeaser) Release(ctx context.Context, id string, discard bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.leases[id]
	if !ok {
		return fmt.Errorf("%w %q", pool.ErrUnknownLease, id)
	}
	switch l.view.State {
	case pool.LeasePending:
		l.view.State = pool.LeaseCanceled
	case pool.LeaseActive:
		l.view.State, l.discard = pool.LeaseReleased, discard
	}
	return nil
}

func (f *fakeLeaser) Pools() []pool.PoolView {
	f.mu.Lock()
	defer f.mu.Unlock()
	return []pool.PoolView{{Name: f.pool, MaxInstances: f.max}}
}

// activate gives the lease of node an instance.
func (f *fakeLeaser) activate(node string) *fakeLease {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.leases[f.byToken[clientToken(node)]]
	if l != nil {
		l.view.State = pool.LeaseActive
		l.view.ExpiresAt = f.now().Add(f.ttl)
	}
	return l
}

// lease returns a copy of the lease of node, nil when it has none.
func (f *fakeLeaser) lease(node string) *fakeLease {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.leases[f.byToken[clientToken(node)]]
	if !ok {
		return nil
	}
	c := *l
	return &c
}

func (f *fakeLeaser) setState(node string, st pool.LeaseState) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.leases[f.byToken[clientToken(node)]].view.State = st
}
