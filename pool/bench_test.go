package pool_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
	"github.com/hangar-ci/hangar/pool/store"
)

// Run with: go test -run '^$' -bench LeaseThroughput -benchtime 5000x -count 5 ./pool
//
// BenchmarkLeaseThroughput: 64 clients lease and release as fast as they
// can through the HTTP API (an httptest server of pool/api) against one
// pool of 64 instances on the fake cloud, whose bootstraps (FakeBootstrap)
// recycle a released instance at their next poll. Every answer waits for
// its fsync'd commit in a real store in b.TempDir(), as in production.
// Reports leases/s, the lease call's p50 and p99 latency (a lease waits
// when all 64 instances are taken or recycling), the release call's p99,
// and the store's commits and write rounds (each with its fsyncs) per
// lease. b.N is the number of leases, spread over the clients.
func BenchmarkLeaseThroughput(b *testing.B) {
	const clients = 64
	bs := newBenchServer(b, clients, clients)
	ctx := context.Background()

	leaseLat := make([]time.Duration, b.N)
	releaseLat := make([]time.Duration, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	before := bs.store.Stats()
	b.ResetTimer()
	start := time.Now()
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= b.N {
					return
				}
				t0 := time.Now()
				v, err := bs.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s"})
				if err != nil || v.State != pool.LeaseActive {
					b.Errorf("lease: %+v, %v", v, err)
					return
				}
				t1 := time.Now()
				if err := bs.client.Release(ctx, v.ID, false); err != nil {
					b.Error(err)
					return
				}
				leaseLat[i], releaseLat[i] = t1.Sub(t0), time.Since(t1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	after := bs.store.Stats()
	n := float64(b.N)
	b.ReportMetric(n/elapsed.Seconds(), "leases/s")
	b.ReportMetric(percentile(leaseLat, 0.50), "p50-lease-ms")
	b.ReportMetric(percentile(leaseLat, 0.99), "p99-lease-ms")
	b.ReportMetric(percentile(releaseLat, 0.99), "p99-release-ms")
	b.ReportMetric(float64(after.Commits-before.Commits)/n, "commits/lease")
	b.ReportMetric(float64(after.Rounds-before.Rounds)/n, "rounds/lease")
}

// percentile returns the p-quantile of d in milliseconds.
func percentile(d []time.Duration, p float64) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, int(float64(len(s))*p))].Seconds() * 1e3
}

type benchServer struct {
	store  *store.Store
	m      *pool.Manager
	client *api.Client
}

// newBenchServer serves the API of a Manager over the fake cloud, with a
// real store, and waits until the pool has minIdle idle instances. The
// Manager logs at Info, as hangar serve does, into io.Discard.
func newBenchServer(b *testing.B, minIdle, maxInstances int) *benchServer {
	b.Helper()
	st, err := store.Open(filepath.Join(b.TempDir(), "state.db"))
	if err != nil {
		b.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	fc := pool.NewBenchCloud()
	o := pool.BenchOptions(minIdle, maxInstances)
	o.Providers = map[string]cloud.Provider{"fake": fc}
	o.Store, o.Logger = st, log
	m, err := pool.New(o)
	if err != nil {
		st.Close()
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	pool.BootOnLaunch(ctx, fc, m)
	done := make(chan struct{})
	go func() {
		defer close(done)
		m.Run(ctx)
	}()
	srv := httptest.NewServer((&api.Server{Manager: m, Log: log}).Handler())
	b.Cleanup(func() {
		srv.Close()
		cancel()
		<-done
		if err := m.Close(); err != nil {
			b.Errorf("closing manager: %v", err)
		}
		st.Close()
	})
	// One kept-alive connection per client, as a CI system's would be.
	tr := &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256}
	b.Cleanup(tr.CloseIdleConnections)
	bs := &benchServer{store: st, m: m, client: &api.Client{BaseURL: srv.URL, HTTP: &http.Client{Transport: tr}}}
	deadline := time.Now().Add(time.Minute)
	for {
		pools, err := bs.client.Pools(context.Background())
		if err == nil && pools[0].Instances[pool.Idle] == minIdle {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the pool never had %d idle instances: %+v, %v", minIdle, pools, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := st.CommitWait(); err != nil {
		b.Fatal(err)
	}
	return bs
}
