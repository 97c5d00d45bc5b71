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
func BenchmarkLeaseThroughput(b *testing.B) { benchThroughput(b, 64, 64) }

// BenchmarkLeaseThroughputLargePool is BenchmarkLeaseThroughput against a
// pool of 1,024 instances, each with its bootstrap in a long poll, as a
// large pool's are: what a lease costs as the pool grows.
func BenchmarkLeaseThroughputLargePool(b *testing.B) { benchThroughput(b, 64, 1024) }

func benchThroughput(b *testing.B, clients, instances int) {
	bs := newBenchServer(b, instances, instances)
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

// BenchmarkWarmLeaseReleaseFake is cmd/hangar's BenchmarkWarmLeaseRelease
// without the local cloud: lease an idle instance and release it through the
// HTTP API, each answer once fsynced, against 8 instances of the fake cloud
// whose bootstraps are goroutines. Nothing but the server and its store
// runs in the timed part, so the figures are the server's path alone.
// Between iterations (clock stopped) the instance recycles, the store is
// let go quiet, and an API round trip (GET /v1/pools) and a commit are
// measured as baselines; x-floor is the lease and release against two of
// each.
func BenchmarkWarmLeaseReleaseFake(b *testing.B) {
	bs := newBenchServer(b, 8, 8)
	cs, err := store.Open(filepath.Join(b.TempDir(), "commit.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		if err := cs.Close(); err != nil {
			b.Errorf("closing commit store: %v", err)
		}
	}()
	ctx := context.Background()
	var leaseT, releaseT, rtT, commitT time.Duration
	before := bs.store.Stats()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		v, err := bs.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s"})
		if err != nil || v.State != pool.LeaseActive {
			b.Fatalf("lease: %+v, %v", v, err)
		}
		t1 := time.Now()
		if err := bs.client.Release(ctx, v.ID, false); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		b.StopTimer()
		leaseT += t1.Sub(t0)
		releaseT += t2.Sub(t1)
		bs.waitIdle(b, 8)
		t3 := time.Now()
		if _, err := bs.client.Pools(ctx); err != nil {
			b.Fatal(err)
		}
		t4 := time.Now()
		if err := cs.CommitWait(store.Op{Kind: store.Leases, ID: v.ID, Value: v}); err != nil {
			b.Fatal(err)
		}
		rtT += t4.Sub(t3)
		commitT += time.Since(t4)
		b.StartTimer()
	}
	b.StopTimer()
	after := bs.store.Stats()
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return d.Seconds() * 1e3 / n }
	b.ReportMetric(ms(leaseT), "lease-ms/op")
	b.ReportMetric(ms(releaseT), "release-ms/op")
	b.ReportMetric(ms(rtT), "rt-ms/op")
	b.ReportMetric(ms(commitT), "commit-ms/op")
	b.ReportMetric(float64(leaseT+releaseT)/float64(2*rtT+2*commitT), "x-floor")
	b.ReportMetric(float64(after.Commits-before.Commits)/n, "commits/op")
	b.ReportMetric(float64(after.Rounds-before.Rounds)/n, "rounds/op")
}

// waitIdle waits until the pool has n idle instances and their records
// are on disk.
func (bs *benchServer) waitIdle(b *testing.B, n int) {
	deadline := time.Now().Add(time.Minute)
	for {
		if p := bs.m.Pools(); p[0].Instances[pool.Idle] == n {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("the pool never had %d idle instances: %+v", n, bs.m.Pools())
		}
		time.Sleep(50 * time.Microsecond)
	}
	if err := bs.store.CommitWait(); err != nil {
		b.Fatal(err)
	}
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
		_ = st.Close()
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
		if err := st.Close(); err != nil {
			b.Errorf("closing store: %v", err)
		}
	})
	// One kept-alive connection per client, as a CI system's would be.
	tr := &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256}
	b.Cleanup(tr.CloseIdleConnections)
	bs := &benchServer{store: st, m: m, client: &api.Client{BaseURL: srv.URL, HTTP: &http.Client{Transport: tr}}}
	bs.waitIdle(b, minIdle)
	return bs
}
