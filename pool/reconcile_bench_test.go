package pool

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/hangar-ci/hangar/bootstrap"
	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/pool/store"
)

// Run with: go test -run '^$' -bench Reconcile10k -benchtime 20x -count 5 -timeout 30m ./pool
//
// BenchmarkReconcile10k: one pool of 10,000 idle instances on the
// in-memory ec2test (no request buckets: the listing is what is measured,
// not AWS's throttle), through the real EC2 provider. An op is one
// reconcile cycle as Run makes it: DescribeInstances in pages of 1,000,
// then the comparison with the store under the Manager's lock, and the
// dispatch after it. Reports besides ns/op:
//   - list-ms/op: the listing alone (the provider and ec2test), measured
//     between cycles;
//   - ec2test-ms/op: of which ec2test's own time answering the pages (in
//     production, EC2's, on another machine);
//   - hangar-ms/op: the cycle without ec2test's time, what it costs the
//     server itself (the lean listing, see cloud/ec2/listing.go, the
//     comparison and the dispatch);
//   - locked-ms/op: the part of a cycle under the Manager's lock (the
//     comparison with the store and the dispatch), when every lease and
//     bootstrap call waits;
//   - heap-MB: the process's live heap after the cycles and a GC, ec2test
//     and its 10,000 instances included: an upper bound of the server's;
//   - peak-heap-MB: the most heap (objects, live or not yet collected)
//     seen during the cycles, sampled every millisecond, ec2test included;
//   - commits/op: store commits per cycle (0 when nothing changed).
//
// The setup launches the 10,000 instances on ec2test with the tags the pool
// gives its own and writes their records, as idle, straight into the
// store, so that it takes seconds rather than the pool's launch pace.
func BenchmarkReconcile10k(b *testing.B) {
	const n = 10_000
	ctx := context.Background()
	// Hermetic: nothing of this machine's AWS setup (a CA bundle would
	// refuse the capturing transport below).
	for k, v := range map[string]string{"AWS_CA_BUNDLE": "", "AWS_PROFILE": "", "AWS_EC2_METADATA_DISABLED": "true",
		"AWS_CONFIG_FILE": filepath.Join(b.TempDir(), "none"), "AWS_SHARED_CREDENTIALS_FILE": filepath.Join(b.TempDir(), "none")} {
		b.Setenv(k, v)
	}
	ec2Time := &tookSum{action: "DescribeInstances"}
	// What the benchmark opens is closed by one cleanup that then forgets
	// it: with -count, the testing package keeps a run's cleanup functions
	// into the next run, and the heap figures would count two pools.
	var closers []func() error
	b.Cleanup(func() {
		for i := len(closers) - 1; i >= 0; i-- {
			if err := closers[i](); err != nil {
				b.Errorf("closing: %v", err)
			}
		}
		closers = nil
	})
	srv := ec2test.New(ec2test.Options{Logger: slog.New(ec2Time)})
	closers = append(closers, func() error { srv.Close(); return nil })
	limits := ec2.DefaultRateLimits()
	wide := ec2.Bucket{Size: 1_000_000, PerSecond: 1_000_000}
	limits.RunInstances, limits.NonMutating, limits.Mutating, limits.LaunchedInstances = wide, wide, wide, wide
	prov, err := ec2.New(ctx, ec2.Options{
		Region:      "us-east-1",
		Endpoint:    srv.URL(),
		Credentials: credentials.NewStaticCredentialsProvider("AKIDBENCH", "bench-secret", ""),
		RateLimits:  &limits,
		Logger:      slog.New(slog.DiscardHandler),
	})
	if err != nil {
		b.Fatal(err)
	}
	closers = append(closers, prov.Close)

	st, err := store.Open(filepath.Join(b.TempDir(), "state.db"))
	if err != nil {
		b.Fatal(err)
	}
	closers = append(closers, st.Close)
	opts := BenchOptions(0, n)
	spec := opts.Pools["demo"]
	spec.Provider = "ec2"
	spec.Launch.Image = ec2test.DefaultImageID
	spec.Launch.InstanceTypes = []string{"t3.micro"}
	opts.Pools = map[string]Spec{"demo": spec}
	opts.Providers = map[string]cloud.Provider{"ec2": prov}
	opts.Store = st
	opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))

	// 10,000 instances, each with its own intent key, launched as the pool
	// would (8 calls at a time), and their records as the pool keeps them.
	start := time.Now()
	var mu sync.Mutex
	var ops []store.Op
	keys := make(chan string)
	var wg sync.WaitGroup
	var launchErr error
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for key := range keys {
				ls := spec.Launch
				ls.ClientToken = key
				ls.UserData = []byte("#!/bin/sh\n")
				ls.Tags = map[string]string{cloud.TagPool: "demo", cloud.TagOwner: st.Owner(), cloud.TagIntent: key}
				got, err := prov.Launch(ctx, ls, 1)
				mu.Lock()
				if err != nil || len(got) != 1 {
					if err == nil {
						err = fmt.Errorf("%d instances, want 1", len(got))
					}
					launchErr = fmt.Errorf("launching %s: %v, %w", key, got, err)
					mu.Unlock()
					continue
				}
				c := got[0]
				now := time.Now()
				in := &Instance{Key: key, ID: c.ID, Pool: "demo", State: Idle, Since: now, Reason: "ready",
					PrivateIP: c.PrivateIP, Type: c.Type, Zone: c.Zone, TokenHash: bootstrap.HashToken(randomToken(32)),
					Password: randomToken(24), TokenRotated: true, IntentAt: now, LaunchedAt: now, ReadyAt: now, LastSeen: now}
				ops = append(ops, store.Op{Kind: store.Instances, ID: key, Value: in})
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < n; i++ {
		keys <- fmt.Sprintf("h-bench%07d", i)
	}
	close(keys)
	wg.Wait()
	if launchErr != nil {
		b.Fatal(launchErr)
	}
	if err := st.CommitWait(ops...); err != nil {
		b.Fatal(err)
	}
	ops = nil
	b.Logf("setup: %d instances launched on ec2test and stored in %s", n, time.Since(start).Round(time.Millisecond))

	m, err := New(opts)
	if err != nil {
		b.Fatal(err)
	}
	closers = append(closers, m.Close)
	if views, err := m.Instances(Admin, "demo"); err != nil || len(views) != n {
		b.Fatalf("%d instances restored, want %d (%v)", len(views), n, err)
	}
	m.reconcile(ctx) // the first cycle: nothing is judged before it
	var listT, lockedT time.Duration
	ec2Time.reset()
	before := st.Stats()
	peak := samplePeakHeap()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		m.reconcile(ctx)
		b.StopTimer()
		t0 := time.Now()
		list, err := prov.List(ctx, map[string]string{cloud.TagOwner: st.Owner()})
		listT += time.Since(t0)
		if err != nil || len(list) != n {
			b.Fatalf("listing: %d instances, %v", len(list), err)
		}
		// What a cycle holds the Manager's lock for, every lease and
		// bootstrap call waiting: the comparison and the dispatch.
		t1 := time.Now()
		m.mu.Lock()
		m.reconcileLocked(prov, list, t0)
		m.dispatchLocked()
		m.unlock()
		lockedT += time.Since(t1)
		b.StartTimer()
	}
	b.StopTimer()
	after := st.Stats()
	m.mu.Lock()
	lost := 0
	for _, in := range m.instances {
		if in.State != Idle {
			lost++
		}
	}
	m.unlock()
	if lost > 0 {
		b.Fatalf("%d of %d instances left idle after the reconciles", lost, n)
	}
	peakMB := peak()
	heap := liveHeapMB()
	ec2ms := ec2Time.total().Seconds() * 1e3 / float64(2*b.N)
	b.ReportMetric(listT.Seconds()*1e3/float64(b.N), "list-ms/op")
	// Each op lists twice (the cycle, and list-ms's own listing).
	b.ReportMetric(ec2ms, "ec2test-ms/op")
	b.ReportMetric(lockedT.Seconds()*1e3/float64(b.N), "locked-ms/op")
	b.ReportMetric(b.Elapsed().Seconds()*1e3/float64(b.N)-ec2ms, "hangar-ms/op")
	b.ReportMetric(heap, "heap-MB")
	b.ReportMetric(peakMB, "peak-heap-MB")
	b.ReportMetric(float64(after.Commits-before.Commits)/float64(b.N), "commits/op")
}

// samplePeakHeap samples the heap's objects every millisecond until the
// returned function is called, which returns the most seen, in MB.
func samplePeakHeap() func() float64 {
	stop, done := make(chan struct{}), make(chan float64)
	go func() {
		sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		var most uint64
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			metrics.Read(sample)
			most = max(most, sample[0].Value.Uint64())
			select {
			case <-tick.C:
			case <-stop:
				done <- float64(most) / 1e6
				return
			}
		}
	}()
	return func() float64 { close(stop); return <-done }
}

// liveHeapMB is the heap in use after a GC, in MB.
func liveHeapMB() float64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return float64(ms.HeapAlloc) / 1e6
}

// tookSum is a slog.Handler for ec2test's request log that adds up the
// "took" of one action's requests.
type tookSum struct {
	action string
	mu     sync.Mutex
	sum    time.Duration
}

func (h *tookSum) Enabled(context.Context, slog.Level) bool { return true }
func (h *tookSum) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *tookSum) WithGroup(string) slog.Handler            { return h }
func (h *tookSum) Handle(_ context.Context, r slog.Record) error {
	var action string
	var took time.Duration
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "action":
			action = a.Value.String()
		case "took":
			took = a.Value.Duration()
		}
		return true
	})
	if action == h.action {
		h.mu.Lock()
		h.sum += took
		h.mu.Unlock()
	}
	return nil
}

func (h *tookSum) reset() {
	h.mu.Lock()
	h.sum = 0
	h.mu.Unlock()
}

func (h *tookSum) total() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.sum
}
