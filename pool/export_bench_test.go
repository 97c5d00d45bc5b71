package pool

import (
	"context"
	"strings"
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

// FakeBootstrap plays the bootstrap of an instance that booted with
// userData until ctx ends, as generic.sh does, minus HTTP: every call is
// authenticated with its token (as the bootstrap endpoints do), it reports
// ready, then long-polls its assignments with rotate=1, using each new token
// it is sent; its worker starts and stops in no time, so a released instance
// is clean again at its next poll.
func FakeBootstrap(ctx context.Context, m *Manager, userData []byte) {
	token := ""
	for line := range strings.Lines(string(userData)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "export HANGAR_BOOTSTRAP_TOKEN="); ok {
			token = strings.Trim(v, "'")
		}
	}
	key := func() (string, error) { return m.Authenticate(bootstrap.HashToken(token)) }
	for ctx.Err() == nil {
		k, err := key()
		if err == nil {
			err = m.Ready(ctx, k, bootstrap.Ready{})
		}
		if err == nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	current := ""
	for ctx.Err() == nil {
		k, err := key()
		if err != nil {
			return // refused: terminated
		}
		a, err := m.Assignment(ctx, k, bootstrap.Poll{Current: current, Run: -1, Rotate: true, Wait: time.Minute, TokenHash: bootstrap.HashToken(token)})
		if err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		if a.NewToken != "" {
			token = a.NewToken
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
		go FakeBootstrap(ctx, m, spec.UserData)
		return nil
	})
}
