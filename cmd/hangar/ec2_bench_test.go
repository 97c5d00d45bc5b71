package main

import (
	"context"
	"log/slog"
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

// BenchmarkEC2ScaleOut500: a pool scaled from 0 to 500 instances under
// AWS's default request limits, with Hangar's client-side buckets set to
// the same table. Reports the time, the calls, and the throttling errors
// EC2 answered (the goal is 0).
func BenchmarkEC2ScaleOut500(b *testing.B) {
	hermeticAWS(b)
	for i := 0; i < b.N; i++ {
		srv := benchEC2Server()
		ts := startTest(b, ec2TOML(b.TempDir(), srv.URL(), "min_idle = 500\nmax_instances = 500\nboot_timeout = \"1h\"\nidle_ttd = \"1h\""), nil)
		start := time.Now()
		testutil.Eventually(b, "500 instances", 20*time.Minute, func() bool { return srv.Running() >= 500 })
		d := time.Since(start)
		calls := srv.Calls()
		b.ReportMetric(d.Seconds(), "s-to-500")
		b.ReportMetric(float64(calls["RunInstances"]), "RunInstances")
		b.ReportMetric(float64(totalCalls(calls)), "calls")
		b.ReportMetric(float64(throttles(srv)), "throttled")
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
		if srv.PeakRunning() > 500 {
			b.Errorf("peak %d instances over max_instances 500", srv.PeakRunning())
		}
		if err := ts.Close(); err != nil {
			b.Errorf("closing hangar: %v", err)
		}
		srv.Close()
	}
}

// BenchmarkEC2SteadyState1000: cloud API calls per minute for a pool of
// 1,000 instances with nothing to do. The pool is filled with a provider
// whose RunInstances bucket is opened wide, then one minute is counted.
func BenchmarkEC2SteadyState1000(b *testing.B) {
	hermeticAWS(b)
	for i := 0; i < b.N; i++ {
		srv := benchEC2Server()
		srv.RateLimit("RunInstances", 0, 0) // filling the pool is not what is measured
		limits := ec2.DefaultRateLimits()
		limits.RunInstances = ec2.Bucket{Size: 1000, PerSecond: 1000}
		limits.LaunchedInstances = ec2.Bucket{Size: 1000, PerSecond: 1000}
		prov, err := ec2.New(context.Background(), ec2.Options{Region: "us-east-1", Endpoint: srv.URL(), RateLimits: &limits, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			b.Fatal(err)
		}
		cfg := ec2TOML(b.TempDir(), srv.URL(), "min_idle = 1000\nmax_instances = 1000\nboot_timeout = \"1h\"\nidle_ttd = \"1h\"")
		cfg = strings.Replace(cfg, `reconcile_interval = "1s"`, `reconcile_interval = "10s"`, 1)
		ts := startTestWith(b, cfg, serveOptions{Providers: map[string]cloud.Provider{"east": prov}})
		testutil.Eventually(b, "1000 instances", 10*time.Minute, func() bool { return srv.Running() >= 1000 })
		time.Sleep(2 * time.Second) // let the launch answers settle
		before := srv.Calls()
		time.Sleep(time.Minute)
		after := srv.Calls()
		perMinute := totalCalls(after) - totalCalls(before)
		b.ReportMetric(float64(perMinute), "calls/min")
		b.ReportMetric(float64(after["DescribeInstances"]-before["DescribeInstances"]), "DescribeInstances/min")
		if err := ts.Close(); err != nil {
			b.Errorf("closing hangar: %v", err)
		}
		srv.Close()
	}
}
