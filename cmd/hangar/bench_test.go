package main

import (
	"context"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// Run with: go test -run '^$' -bench . -benchtime 200x ./cmd/hangar
//
// BenchmarkAPIRoundTrip is the baseline: one authenticated-path JSON GET
// through the same server, so the lease figures can be read as a ratio
// against it on a noisy machine.
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

// BenchmarkWarmLeaseRelease: lease an idle instance and release it, through
// the HTTP API, each answer sent only once the change is fsynced. The clock
// stops while the released instance recycles (its bootstrap stops the worker
// and reports clean, a bash-and-curl round of tens of milliseconds), so
// every lease is warm; the recycle time is reported on its own.
func BenchmarkWarmLeaseRelease(b *testing.B) {
	ts := benchServer(b)
	ctx := context.Background()
	var recycle time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		v, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "60s"})
		if err != nil || v.State != pool.LeaseActive {
			b.Fatalf("lease: %+v, %v", v, err)
		}
		if err := ts.client.Release(ctx, v.ID, false); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		t0 := time.Now()
		waitIdle(b, ts)
		recycle += time.Since(t0)
		b.StartTimer()
	}
	b.ReportMetric(float64(recycle.Milliseconds())/float64(b.N), "recycle-ms/op")
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
	waitIdle(b, ts)
}

func benchServer(b *testing.B) *testServer {
	ts := startTest(b, testTOML(b.TempDir(), "demo", "min_idle = 8\nmax_instances = 8\n"), nil)
	waitIdle(b, ts)
	return ts
}

func waitIdle(b *testing.B, ts *testServer) {
	deadline := time.Now().Add(time.Minute)
	for {
		pools, err := ts.client.Pools(context.Background())
		if err == nil && pools[0].Instances[pool.Idle] == 8 {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("the pool never got back to 8 idle instances: %+v, %v", pools, err)
		}
		time.Sleep(time.Millisecond)
	}
}
