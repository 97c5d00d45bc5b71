package main

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
	"github.com/hangar-ci/hangar/pool/store"
)

// Run with: go test -run '^$' -bench 'APIRoundTrip|Commit|WarmLeaseRelease$' -benchtime 300x -count 5 ./cmd/hangar
//
// BenchmarkAPIRoundTrip and BenchmarkCommit are the baselines: one
// authenticated-path JSON GET through the same server, and one fsync'd
// store commit in the same file system, so that the lease figures can be
// read as a ratio against them on a noisy machine. BenchmarkWarmLeaseRelease
// also measures both baselines itself, interleaved with its own iterations,
// and reports its time against their floor (two round trips plus two
// commits) as x-floor.
func BenchmarkAPIRoundTrip(b *testing.B) {
	ts := benchServer(b)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := ts.client.Pools(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCommit is one writer waiting for each commit of a lease-sized
// record: the durability a lease answer (and a release answer) waits for.
func BenchmarkCommit(b *testing.B) {
	s := benchStore(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := benchCommit(s, i); err != nil {
			b.Fatal(err)
		}
	}
}

func benchStore(b *testing.B) *store.Store {
	s, err := store.Open(filepath.Join(b.TempDir(), "commit.db"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := s.Close(); err != nil {
			b.Errorf("closing commit store: %v", err)
		}
	})
	return s
}

// benchCommit writes a record the size of a lease's, as a lease answer
// waits for one.
func benchCommit(s *store.Store, i int) error {
	now := time.Now()
	l := pool.Lease{ID: fmt.Sprintf("l-bench%08d", i), Pool: "demo", State: pool.LeaseActive, InstanceKey: "h-0123456789abcdef",
		Worker: pool.Worker{Name: "demo-bench", Password: "0123456789abcdef0123456789abcdef"}, TTL: time.Hour,
		CreatedAt: now, AssignedAt: now, ExpiresAt: now.Add(time.Hour)}
	return s.CommitWait(store.Op{Kind: store.Leases, ID: l.ID, Value: l})
}

// BenchmarkWarmLeaseRelease: lease an idle instance and release it, through
// the HTTP API, each answer sent only once the change is fsynced. The clock
// stops while the released instance recycles (its bootstrap stops the worker
// and reports clean, a bash-and-curl round of tens of milliseconds), so
// every lease is warm; the recycle time is reported on its own.
//
// A recycle ends with writes (the instance idle again, its new token in
// use): the next lease starts once they are on disk, as it would on a
// server whose instance has been idle a while, rather than queueing behind
// their fsync. Measured right after the instance was seen idle in memory,
// as this benchmark used to, a lease pays for the recycle's commit too;
// that is reported, interleaved and untimed, as issued-ms/op and
// issued-x-floor.
//
// Besides ns/op it reports, per iteration: lease-ms and release-ms (the two
// calls); rt-ms and commit-ms, an API round trip and a commit measured
// between iterations on the same server and file system; x-floor, the
// lease and release against two of each; commits/op and rounds/op, the
// store commits and fsync'd write rounds of the whole server per lease and
// release (2 of them the lease's and the release's, the rest the
// recycle's); during/op, the commits other than the release's own made
// between the lease's answer and the release's (the instance taking up
// its lease), which a release would queue behind.
func BenchmarkWarmLeaseRelease(b *testing.B) {
	ts := benchServer(b)
	cs := benchStore(b)
	ctx := context.Background()
	var recycle, leaseT, releaseT, rtT, commitT, issuedT time.Duration
	var during int64
	leaseRelease := func() (lease, release time.Duration) {
		t0 := time.Now()
		v, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s"})
		if err != nil || v.State != pool.LeaseActive {
			b.Fatalf("lease: %+v, %v", v, err)
		}
		c0 := ts.store.Stats().Commits
		defer func() { during += ts.store.Stats().Commits - c0 - 1 }()
		t1 := time.Now()
		if err := ts.client.Release(ctx, v.ID, false); err != nil {
			b.Fatal(err)
		}
		return t1.Sub(t0), time.Since(t1)
	}
	before := ts.store.Stats()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l, r := leaseRelease()
		b.StopTimer()
		leaseT += l
		releaseT += r
		t2 := time.Now()
		waitIdle(b, ts, false)
		recycle += time.Since(t2)
		// As issued: at once, the recycle's writes still in flight.
		l, r = leaseRelease()
		issuedT += l + r
		waitIdle(b, ts, true)
		// The baselines, interleaved: the same machine load as the lease.
		t3 := time.Now()
		if _, err := ts.client.Pools(ctx); err != nil {
			b.Fatal(err)
		}
		t4 := time.Now()
		if err := benchCommit(cs, i); err != nil {
			b.Fatal(err)
		}
		rtT += t4.Sub(t3)
		commitT += time.Since(t4)
		b.StartTimer()
	}
	b.StopTimer()
	after := ts.store.Stats()
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return d.Seconds() * 1e3 / n }
	floor := float64(2*rtT + 2*commitT)
	b.ReportMetric(ms(recycle), "recycle-ms/op")
	b.ReportMetric(ms(leaseT), "lease-ms/op")
	b.ReportMetric(ms(releaseT), "release-ms/op")
	b.ReportMetric(ms(rtT), "rt-ms/op")
	b.ReportMetric(ms(commitT), "commit-ms/op")
	b.ReportMetric(float64(leaseT+releaseT)/floor, "x-floor")
	b.ReportMetric(ms(issuedT), "issued-ms/op")
	b.ReportMetric(float64(issuedT)/floor, "issued-x-floor")
	// Each iteration leases and releases twice.
	b.ReportMetric(float64(after.Commits-before.Commits)/(2*n), "commits/op")
	b.ReportMetric(float64(after.Rounds-before.Rounds)/(2*n), "rounds/op")
	b.ReportMetric(float64(during)/(2*n), "during/op")
}

// BenchmarkWarmLeaseReleaseParallel: leases and releases from 8 clients at
// once, back to back, without waiting for recycles: the pool's throughput,
// bounded by how fast eight instances recycle.
func BenchmarkWarmLeaseReleaseParallel(b *testing.B) {
	ts := benchServer(b)
	ctx := context.Background()
	b.SetParallelism(4) // 4 × GOMAXPROCS clients
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			v, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s"})
			if err != nil || v.State != pool.LeaseActive {
				b.Errorf("lease: %+v, %v", v, err)
				return
			}
			if err := ts.client.Release(ctx, v.ID, false); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	waitIdle(b, ts, true)
}

func benchServer(b *testing.B) *testServer {
	ts := startTest(b, testTOML(b.TempDir(), "demo", "min_idle = 8\nmax_instances = 8\n"), nil)
	waitIdle(b, ts, true)
	return ts
}

// waitIdle waits until the pool's 8 instances are idle and, with quiet,
// until their records are on disk too.
func waitIdle(b *testing.B, ts *testServer, quiet bool) {
	deadline := time.Now().Add(time.Minute)
	for {
		pools, err := ts.client.Pools(context.Background())
		if err == nil && pools[0].Instances[pool.Idle] == 8 {
			if quiet {
				// A barrier: it costs no fsync of its own.
				if err := ts.store.CommitWait(); err != nil {
					b.Fatal(err)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("the pool never got back to 8 idle instances: %+v, %v", pools, err)
		}
		time.Sleep(time.Millisecond)
	}
}
