package pool

import (
	"context"
	"time"

	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
)

// Bench-only access to this package's test doubles for the benchmarks of
// package pool_test (bench_test.go), which serve the HTTP API of pool/api
// and so cannot be in package pool themselves.

// BenchCloud is the fake cloud of the package's tests: instances in
// memory, each "launched" in a moment.
type BenchCloud = fakeCloud

// NewBenchCloud returns an empty fake cloud.
func NewBenchCloud() *BenchCloud { return newFakeCloud(newFakeClock()) }

// BenchOptions are the tests' options (testOptions): one pool, "demo", on
// provider "fake", with min_idle and max_instances as given, and nothing
// timing out during a benchmark. The caller adds the provider, the store,
// the logger and, if it likes, a clock.
func BenchOptions(minIdle, maxInstances int) Options {
	o := testOptions(func(s *Spec) {
		s.MinIdle, s.MaxInstances = minIdle, maxInstances
		s.IdleTTD, s.BootTimeout = time.Hour, time.Hour
	})
	o.ReconcileInterval = time.Minute
	return o
}

// FakeBootstrap plays the bootstrap of the instance whose launch intent
// (cloud.TagIntent, the launch's client token) is key, until ctx ends: it
// reports ready, then long-polls its assignments as generic.sh does, and
// its worker starts and stops in no time, so a released instance is clean
// again at its next poll. It calls the Manager directly: the bootstrap's
// HTTP side is not what the lease benchmarks measure.
func FakeBootstrap(ctx context.Context, m *Manager, key string) {
	for ctx.Err() == nil {
		if err := m.Ready(ctx, key, bootstrap.Ready{}); err == nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	current := ""
	for ctx.Err() == nil {
		a, err := m.Assignment(ctx, key, bootstrap.Poll{Current: current, Run: -1, Wait: time.Minute})
		if err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		switch a.State {
		case bootstrap.AssignAssigned:
			current = a.LeaseID
		case bootstrap.AssignReleased:
			current = ""
		case bootstrap.AssignTerminate:
			return
		}
	}
}

// BootOnLaunch runs a FakeBootstrap for every instance c launches.
func BootOnLaunch(ctx context.Context, c *BenchCloud, m *Manager) {
	c.SetAfterLaunch(func(_ context.Context, spec cloud.LaunchSpec) error {
		go FakeBootstrap(ctx, m, spec.ClientToken)
		return nil
	})
}
