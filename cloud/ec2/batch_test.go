package ec2

// Launches of many instances in one RunInstances: launch indexes, short
// starts, replays after a crash, and the instance buckets.

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
)

// launchIndexes returns the instances' launch indexes, sorted.
func launchIndexes(insts []cloud.Instance) []int {
	out := make([]int, len(insts))
	for i, in := range insts {
		out[i] = in.LaunchIndex
	}
	slices.Sort(out)
	return out
}

func upTo(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// TestBatchLaunchOneCall: 50 instances are one RunInstances with one
// user-data, and both Launch and List report launch indexes 0..49.
func TestBatchLaunchOneCall(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	spec := launchSpec("batch-50", "t3.small", "t3a.small")
	spec.UserData = []byte("#!/bin/sh\necho batch\n")
	insts, err := p.Launch(ctx, spec, 50)
	if err != nil {
		t.Fatal(err)
	}
	if n := srv.Calls()["RunInstances"]; n != 1 {
		t.Errorf("%d RunInstances for 50 instances, want 1", n)
	}
	if got := launchIndexes(insts); !slices.Equal(got, upTo(50)) {
		t.Errorf("Launch's launch indexes %v, want 0..49", got)
	}
	listed, err := p.List(ctx, map[string]string{cloud.TagIntent: "batch-50"})
	if err != nil {
		t.Fatal(err)
	}
	if got := launchIndexes(listed); !slices.Equal(got, upTo(50)) {
		t.Errorf("List's launch indexes %v, want 0..49", got)
	}
	for _, in := range srv.Instances() {
		if string(in.UserData) != string(spec.UserData) {
			t.Fatalf("instance %s has user-data %q, want the batch's", in.ID, in.UserData)
		}
	}
}

// TestBatchPartialCapacity: an offering with room for 30 of 50 starts 30,
// and Launch returns them with a capacity error for the rest; the next
// launch starts on the next offering without asking the short one.
func TestBatchPartialCapacity(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.SetCapacityCount(func(typ, zone, market string) int {
		if typ == "t3.small" {
			return 30
		}
		return -1
	})
	ft := newFaultyTransport()
	p := newProvider(t, srv, func(o *Options) { o.HTTPClient = &http.Client{Transport: ft} })
	ctx := testCtx(t)
	insts, err := p.Launch(ctx, launchSpec("short-1", "t3.small", "t3a.small"), 50)
	wantErrIs(t, err, cloud.ErrCapacity)
	if len(insts) != 30 {
		t.Fatalf("Launch returned %d instances, want the 30 started", len(insts))
	}
	if got := launchIndexes(insts); !slices.Equal(got, upTo(30)) {
		t.Errorf("launch indexes %v, want 0..29", got)
	}
	if srv.Running() != 30 {
		t.Errorf("%d running, want 30", srv.Running())
	}

	insts, err = p.Launch(ctx, launchSpec("short-2", "t3.small", "t3a.small"), 20)
	if err != nil {
		t.Fatal(err)
	}
	if len(insts) != 20 || insts[0].Type != "t3a.small" {
		t.Errorf("next launch: %d of %s, want 20 of t3a.small", len(insts), insts[0].Type)
	}
	if n := ft.sent("RunInstances", "t3.small"); n != 1 {
		t.Errorf("t3.small asked %d times, want 1: the short offering is skipped for a while", n)
	}
}

// TestBatchReplayAfterCrash: a batch landed on the second offering and
// its caller never heard. A fresh provider, with the first offering free
// again, returns the same 50 instances and starts none.
func TestBatchReplayAfterCrash(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ctx := testCtx(t)
	spec := launchSpec("replay-50", "t3.small", "t3a.small")
	var full atomic.Bool
	full.Store(true)
	srv.SetCapacity(func(typ, zone, market string) string {
		if full.Load() && typ == "t3.small" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	ft := newFaultyTransport()
	ft.lose = func(action string, n int) bool { return action == "RunInstances" && n >= 2 }
	crashed := newProvider(t, srv, func(o *Options) { o.HTTPClient = &http.Client{Transport: ft} })
	cctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	_, err := crashed.Launch(cctx, spec, 50)
	cancel()
	if err == nil || errors.Is(err, cloud.ErrCapacity) {
		t.Fatalf("first Launch: %v, want an error that is not a capacity error", err)
	}
	if srv.Running() != 50 {
		t.Fatalf("%d running after the lost launch, want 50", srv.Running())
	}
	var landed []string
	for _, in := range srv.Instances() {
		landed = append(landed, in.ID)
	}

	full.Store(false)
	insts, err := newProvider(t, srv, nil).Launch(ctx, spec, 50)
	if err != nil {
		t.Fatal(err)
	}
	if got := instanceIDs(insts); !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(landed))) {
		t.Errorf("the relaunch returned %d instances, not the 50 that landed", len(got))
	}
	if got := launchIndexes(insts); !slices.Equal(got, upTo(50)) {
		t.Errorf("launch indexes %v, want 0..49", got)
	}
	if srv.Running() != 50 {
		t.Errorf("%d running, want 50: the relaunch started more", srv.Running())
	}
}

// TestBatchUnderInstanceBuckets: with AWS's request and instance buckets
// on the server and the same on the client, 1,200 instances in batches of
// 50 start without one throttling error: past the instance burst the
// client waits for tokens instead of provoking RequestLimitExceeded.
func TestBatchUnderInstanceBuckets(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	// AWS's sizes; the refill is faster so that the 200 instances past
	// the burst take a second, not 100.
	srv.RateLimit("RunInstances", 5, 50)
	srv.RateLimitResource("RunInstances", 1000, 200)
	limits := DefaultRateLimits()
	limits.RunInstances.PerSecond = 50
	limits.LaunchedInstances.PerSecond = 200
	// The client counts a request when it sends it, EC2 when it arrives:
	// a first request slower to arrive than the next leaves EC2 a little
	// behind the client's count. A token's margin on each side, as an
	// operator would leave one, keeps such jitter from being a throttle.
	limits.RunInstances.Size--
	limits.LaunchedInstances.Size -= 50
	p := newProvider(t, srv, func(o *Options) { o.RateLimits = &limits })
	ctx := testCtx(t)
	started := 0
	for i := 0; started < 1200; i++ {
		insts, err := p.Launch(ctx, launchSpec("bucket-"+strconv.Itoa(i), "t3.small", "t3a.small"), 50)
		if err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
		started += len(insts)
	}
	if n := srv.Errors()["RunInstances/RequestLimitExceeded"]; n != 0 {
		t.Errorf("%d RunInstances throttled by EC2, want 0: the client should have waited", n)
	}
	if n := srv.Calls()["RunInstances"]; n != 24 {
		t.Errorf("%d RunInstances for 1,200 instances, want 24", n)
	}
	if srv.Running() != 1200 {
		t.Errorf("%d running, want 1200", srv.Running())
	}
}

// TestLaunchHeadroom: the headroom is the instance bucket's tokens plus a
// minute of refill, and a launch that starts short is charged only what
// it started.
func TestLaunchHeadroom(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.SetCapacityCount(func(typ, zone, market string) int { return 10 })
	p := newProvider(t, srv, nil)
	full := p.LaunchHeadroom()
	if full != 1000+60*2 {
		t.Errorf("headroom %d before any launch, want 1120 (1,000 tokens and 60 s at 2/s)", full)
	}
	insts, err := p.Launch(testCtx(t), launchSpec("headroom", "t3.small"), 50)
	wantErrIs(t, err, cloud.ErrCapacity)
	if len(insts) != 10 {
		t.Fatalf("started %d, want 10", len(insts))
	}
	// 990 tokens, and what a few seconds at most refill.
	if got := p.LaunchHeadroom(); got < 990+120 || got > 990+120+10 {
		t.Errorf("headroom %d after starting 10 of 50, want about 1110: the 40 not started must be given back", got)
	}
	unlimited := newProvider(t, srv, func(o *Options) { o.RateLimits = &RateLimits{} })
	if got := unlimited.LaunchHeadroom(); got < 1<<20 {
		t.Errorf("headroom %d without an instance bucket, want a large number", got)
	}
}
