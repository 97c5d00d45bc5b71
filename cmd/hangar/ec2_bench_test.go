package main

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/internal/testutil"
)

// Run with: go test -run '^$' -bench EC2 -benchtime 1x -timeout 30m ./cmd/hangar
//
// The EC2 test server keeps its instances in memory and enforces AWS's
// published request buckets, so a throttling error would show as
// RequestLimitExceeded; nothing boots, so instances stay "booting" (the
// pools' boot_timeout is an hour).

// benchEC2Server is an in-memory EC2 with the pools' image and AWS's
// request buckets.
func benchEC2Server() *ec2test.Server {
	srv := ec2test.New(ec2test.Options{})
	srv.AddImage(ec2test.Image{ID: "ami-0123456789abcdef0", Name: "hangar-worker-2026-11-01", Owner: "123456789012", Created: time.Now().Add(-time.Hour)})
	awsBuckets(srv)
	return srv
}

func awsBuckets(srv *ec2test.Server) {
	srv.RateLimit("RunInstances", 5, 2)
	for _, a := range []string{"DescribeInstances", "DescribeImages", "GetConsoleOutput"} {
		srv.RateLimit(a, 100, 20)
	}
	for _, a := range []string{"TerminateInstances", "StopInstances", "StartInstances", "CreateTags"} {
		srv.RateLimit(a, 50, 5)
	}
}

func throttles(srv *ec2test.Server) int {
	n := 0
	for k, c := range srv.Errors() {
		if strings.HasSuffix(k, "/RequestLimitExceeded") {
			n += c
		}
	}
	return n
}

func totalCalls(m map[string]int) int {
	n := 0
	for _, c := range m {
		n += c
	}
	return n
}

// BenchmarkEC2ScaleOut500: a pool scaled from 0 to 500 ready instances
// under AWS's default limits, the request buckets and RunInstances'
// instance bucket (1,000, refilled 2/s), with Hangar's client-side buckets
// set to the same table: one instance a call (launch_batch = 1, before
// issue 14) against batches of 50 that enroll (after), in the same run.
// The instances are played by fakeBooter. Reports the simulated API time
// (the first RunInstances sent to the last answered), the time to 500
// launched and to 500 ready, the calls, the throttling errors EC2 answered
// and the launch errors that reached the pool (the goal is 0 of both).
func BenchmarkEC2ScaleOut500(b *testing.B) {
	hermeticAWS(b)
	for _, batch := range []int{1, 50} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				scaleOut500(b, batch)
			}
		})
	}
}

func scaleOut500(b *testing.B, batch int) {
	srv := benchEC2Server()
	srv.RateLimitResource("RunInstances", 1000, 2)
	defer srv.Close()
	boots := newFakeBooter(srv)
	ctx, stop := context.WithCancel(context.Background())
	booted := make(chan struct{})
	go func() { defer close(booted); boots.run(ctx) }()
	defer func() { stop(); <-booted }()

	start := time.Now()
	ts := startTest(b, ec2TOML(b.TempDir(), srv.URL(), fmt.Sprintf("min_idle = 500\nmax_instances = 500\nboot_timeout = \"1h\"\nidle_ttd = \"1h\"\nlaunch_batch = %d", batch)), nil)
	var launched time.Duration
	testutil.Eventually(b, "500 ready", 20*time.Minute, func() bool {
		if launched == 0 && srv.Running() >= 500 {
			launched = time.Since(start)
		}
		return boots.readyCount() >= 500
	})
	ready := time.Since(start)
	calls := srv.Calls()
	spans := srv.Timeline("RunInstances")
	var apiTime time.Duration
	if len(spans) > 0 {
		first, last := spans[0].Start, spans[0].Start
		for _, sp := range spans {
			if sp.Start.Before(first) {
				first = sp.Start
			}
			if sp.Code == "" && sp.End.After(last) {
				last = sp.End
			}
		}
		apiTime = last.Sub(first)
	}
	b.ReportMetric(apiTime.Seconds(), "api-s")
	b.ReportMetric(launched.Seconds(), "s-to-500-launched")
	b.ReportMetric(ready.Seconds(), "s-to-500-ready")
	b.ReportMetric(float64(calls["RunInstances"]), "RunInstances")
	b.ReportMetric(float64(totalCalls(calls)), "calls")
	b.ReportMetric(float64(throttles(srv)), "throttled")
	b.ReportMetric(boots.enrollQuantile(0.99).Seconds()*1000, "enroll-p99-ms")
	// What reached the pool: launches that failed, by class.
	failed := 0
	for _, line := range strings.Split(scrape(b, ts.url), "\n") {
		if strings.HasPrefix(line, "hangar_launch_errors_total{") {
			failed++
			b.Log(line)
		}
	}
	b.ReportMetric(float64(failed), "pool-launch-error-kinds")
	b.Logf("EC2 errors answered: %v", srv.Errors())
	for _, err := range boots.errs() {
		b.Errorf("boot: %v", err)
	}
	if srv.PeakRunning() > 500 {
		b.Errorf("peak %d instances over max_instances 500", srv.PeakRunning())
	}
	if err := ts.Close(); err != nil {
		b.Errorf("closing hangar: %v", err)
	}
}

// BenchmarkEC2SteadyState1000 and …10000: cloud API calls per minute for
// a pool of 1,000 (10,000) ready instances with nothing to do, and how long
// a reconcile's listing takes (DescribeInstances' pages of one cycle, as
// ec2test timed them: first page asked to last answered; the comparison
// under the Manager's lock is BenchmarkReconcile10k's). The pool is filled
// in batches of 50 with a provider whose RunInstances buckets are opened
// wide, then one minute is counted.
func BenchmarkEC2SteadyState1000(b *testing.B)  { steadyState(b, 1000) }
func BenchmarkEC2SteadyState10000(b *testing.B) { steadyState(b, 10000) }

func steadyState(b *testing.B, n int) {
	hermeticAWS(b)
	for i := 0; i < b.N; i++ {
		srv := benchEC2Server()
		srv.RateLimit("RunInstances", 0, 0) // filling the pool is not what is measured
		limits := ec2.DefaultRateLimits()
		limits.RunInstances = ec2.Bucket{Size: 1000, PerSecond: 1000}
		limits.LaunchedInstances = ec2.Bucket{Size: n, PerSecond: float64(n)}
		prov, err := ec2.New(context.Background(), ec2.Options{Region: "us-east-1", Endpoint: srv.URL(), RateLimits: &limits, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		boots := newFakeBooter(srv)
		ctx, stop := context.WithCancel(context.Background())
		booted := make(chan struct{})
		go func() { defer close(booted); boots.run(ctx) }()
		cfg := ec2TOML(b.TempDir(), srv.URL(), fmt.Sprintf("min_idle = %d\nmax_instances = %d\nboot_timeout = \"1h\"\nidle_ttd = \"1h\"\nlaunch_batch = 50", n, n))
		cfg = strings.Replace(cfg, `reconcile_interval = "1s"`, `reconcile_interval = "10s"`, 1)
		ts := startTestWith(b, cfg, serveOptions{Providers: map[string]cloud.Provider{"east": prov}})
		testutil.Eventually(b, fmt.Sprintf("%d ready", n), 10*time.Minute, func() bool { return boots.readyCount() >= n })
		time.Sleep(2 * time.Second) // let the launch answers settle
		before := srv.Calls()
		from := time.Now()
		time.Sleep(time.Minute)
		after := srv.Calls()
		perMinute := totalCalls(after) - totalCalls(before)
		b.ReportMetric(float64(perMinute), "calls/min")
		b.ReportMetric(float64(after["DescribeInstances"]-before["DescribeInstances"]), "DescribeInstances/min")
		cycles := listingCycles(srv.Timeline("DescribeInstances"), from)
		if len(cycles) > 0 {
			b.ReportMetric(float64(cycles[len(cycles)/2].Milliseconds()), "listing-p50-ms")
			b.ReportMetric(float64(cycles[len(cycles)-1].Milliseconds()), "listing-max-ms")
		}
		for _, err := range boots.errs() {
			b.Errorf("boot: %v", err)
		}
		if err := ts.Close(); err != nil {
			b.Errorf("closing hangar: %v", err)
		}
		stop()
		<-booted
		srv.Close()
	}
}

// listingCycles groups the DescribeInstances requests that began after
// from into reconcile cycles (a page asked within a second of the last
// answer belongs to the same cycle) and returns each cycle's time, first
// asked to last answered, sorted.
func listingCycles(spans []ec2test.Span, from time.Time) []time.Duration {
	var cycles []time.Duration
	var start, end time.Time
	for _, sp := range spans {
		if sp.Start.Before(from) {
			continue
		}
		if !start.IsZero() && sp.Start.Sub(end) > time.Second {
			cycles = append(cycles, end.Sub(start))
			start = time.Time{}
		}
		if start.IsZero() {
			start = sp.Start
		}
		end = sp.End
	}
	if !start.IsZero() {
		cycles = append(cycles, end.Sub(start))
	}
	slices.Sort(cycles)
	return cycles
}
