package ec2

// Launch through the real SDK against ec2test: what reaches EC2,
// idempotency, capacity fallback, quotas and images.

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
)

func TestLaunchReachesEC2(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	// EC2 refuses a launch with a key pair it does not know.
	if err := p.ImportKeyPair(ctx, "ops", []byte(testEd25519Key)); err != nil {
		t.Fatal(err)
	}

	spec := cloud.LaunchSpec{
		Image:           ec2test.DefaultImageID,
		InstanceTypes:   []string{"c7i.large"},
		Zones:           []string{"us-east-1b"},
		UserData:        []byte("#!/bin/bash\necho booted\n"),
		Tags:            map[string]string{cloud.TagPool: "ci", cloud.TagOwner: "o-1", cloud.TagIntent: "intent-1", "team": "build"},
		ClientToken:     "intent-1",
		SecurityGroups:  []string{"sg-0123456789abcdef0"},
		KeyName:         "ops",
		InstanceProfile: "hangar-worker",
		RootVolumeGB:    50,
		Spot:            "prefer",
	}
	insts, err := p.Launch(ctx, spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(insts) != 1 {
		t.Fatalf("Launch returned %d instances, want 1", len(insts))
	}
	got := insts[0]
	if got.Type != "c7i.large" || got.Zone != "us-east-1b" || got.Image != ec2test.DefaultImageID || got.PrivateIP == "" || got.LaunchedAt.IsZero() {
		t.Errorf("Launch returned %+v", got)
	}
	if !maps.Equal(got.Tags, spec.Tags) {
		t.Errorf("returned tags %v, want %v", got.Tags, spec.Tags)
	}

	in := serverInstance(t, srv, got.ID)
	checks := []struct {
		what      string
		got, want any
	}{
		{"tags", in.Tags, spec.Tags},
		{"volume tags", in.VolumeTags, spec.Tags},
		{"user-data", string(in.UserData), string(spec.UserData)},
		{"client token", in.ClientToken, clientToken("intent-1", offering{Type: "c7i.large", Zone: "us-east-1b", Spot: true})},
		{"market", in.Market, "spot"},
		{"zone", in.Zone, "us-east-1b"},
		{"http tokens", in.HTTPTokens, "required"},
		{"hop limit", in.HopLimit, 1},
		{"key name", in.KeyName, "ops"},
		{"profile", in.Profile, "arn:aws:iam::123456789012:instance-profile/hangar-worker"},
		{"security groups", strings.Join(in.SecurityGroups, ","), "sg-0123456789abcdef0"},
		{"root volume", in.RootVolumeGB, 50},
	}
	for _, c := range checks {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("ec2test got %s %v, want %v", c.what, c.got, c.want)
		}
	}

	// Errors say what failed with EC2's code, and never carry user-data.
	secret := bytes.Repeat([]byte("SECRET-USERDATA "), 2000) // over EC2's 16 KiB
	big := launchSpec("too-big")
	big.UserData = secret
	_, err = p.Launch(ctx, big, 1)
	if err == nil || !strings.Contains(err.Error(), "InvalidParameterValue") || !strings.HasPrefix(err.Error(), "launching 1 t3.small") {
		t.Errorf("Launch with oversized user-data: %v", err)
	}
	if err != nil && (strings.Contains(err.Error(), "SECRET") || strings.Contains(err.Error(), base64.StdEncoding.EncodeToString(secret[:30]))) {
		t.Errorf("error carries the user-data: %.200s", err)
	}

	// A subnet takes the zone's place; metadata options from the spec.
	spec2 := launchSpec("intent-2")
	spec2.Subnets = []string{"subnet-us-east-1c"}
	spec2.MetadataHTTPTokens, spec2.MetadataHopLimit = "optional", 2
	insts, err = p.Launch(ctx, spec2, 1)
	if err != nil {
		t.Fatal(err)
	}
	in = serverInstance(t, srv, insts[0].ID)
	if in.Subnet != "subnet-us-east-1c" || in.Zone != "us-east-1c" || in.HTTPTokens != "optional" || in.HopLimit != 2 || in.Market != "on-demand" {
		t.Errorf("ec2test got subnet %s zone %s tokens %s hops %d market %s", in.Subnet, in.Zone, in.HTTPTokens, in.HopLimit, in.Market)
	}
}

func TestLaunchIdempotent(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ft := newFaultyTransport()
	obs := newObserver()
	p := newProvider(t, srv, func(o *Options) {
		o.HTTPClient = &http.Client{Transport: ft}
		o.Observe = obs.observe
	})
	ctx := testCtx(t)

	t.Run("same token twice", func(t *testing.T) {
		spec := launchSpec("twice")
		first, err := p.Launch(ctx, spec, 2)
		if err != nil {
			t.Fatal(err)
		}
		again, err := p.Launch(ctx, spec, 2)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(instanceIDs(first), instanceIDs(again)) {
			t.Errorf("second Launch returned %v, want %v", instanceIDs(again), instanceIDs(first))
		}
		if n := srv.Launches(clientToken("twice", offering{Type: "t3.small"})); n != 1 {
			t.Errorf("EC2 launched %d times for one token, want 1", n)
		}
	})

	t.Run("same token, new user-data", func(t *testing.T) {
		// A restarted pool retries an intent with fresh user-data; EC2
		// calls that IdempotentParameterMismatch, and the launch that did
		// happen is the answer.
		spec := launchSpec("rerendered")
		spec.UserData = []byte("#!/bin/bash\necho first\n")
		first, err := p.Launch(ctx, spec, 1)
		if err != nil {
			t.Fatal(err)
		}
		spec.UserData = []byte("#!/bin/bash\necho second\n")
		again, err := p.Launch(ctx, spec, 1)
		if err != nil {
			t.Fatalf("relaunch with new user-data: %v", err)
		}
		if !slices.Equal(instanceIDs(first), instanceIDs(again)) {
			t.Errorf("relaunch returned %v, want %v", instanceIDs(again), instanceIDs(first))
		}
		if n := srv.Errors()["RunInstances/IdempotentParameterMismatch"]; n != 1 {
			t.Errorf("%d IdempotentParameterMismatch, want 1 (the case under test)", n)
		}
	})

	t.Run("lost answer", func(t *testing.T) {
		// EC2 launches, but the answer never arrives: the SDK asks again
		// with the same token and gets the same instance.
		before := ft.count("RunInstances")
		ft.mu.Lock()
		ft.lose = func(action string, n int) bool { return action == "RunInstances" && n == before+1 }
		ft.mu.Unlock()
		defer func() { ft.mu.Lock(); ft.lose = nil; ft.mu.Unlock() }()

		running := srv.Running()
		insts, err := p.Launch(ctx, launchSpec("lost"), 1)
		if err != nil {
			t.Fatal(err)
		}
		if got := ft.count("RunInstances") - before; got != 2 {
			t.Errorf("RunInstances sent %d times, want 2 (lost, then asked again)", got)
		}
		if n := srv.Launches(clientToken("lost", offering{Type: "t3.small"})); n != 1 {
			t.Errorf("EC2 launched %d times for one token, want 1", n)
		}
		if got := srv.Running() - running; got != 1 {
			t.Errorf("%d instances started, want 1", got)
		}
		if serverInstance(t, srv, insts[0].ID).ClientToken != clientToken("lost", offering{Type: "t3.small"}) {
			t.Error("Launch returned an instance of another token")
		}
		if _, codes := obs.snapshot(); codes["RunInstances/RequestError"] != 1 {
			t.Errorf("observed codes %v, want one RunInstances/RequestError", codes)
		}
	})

	t.Run("lost answer is no capacity error", func(t *testing.T) {
		// The first offering's answer is lost while the second has room:
		// the launch must not move on, or both could end up running.
		before := ft.count("RunInstances")
		ft.mu.Lock()
		ft.lose = func(action string, n int) bool { return action == "RunInstances" && n == before+1 }
		ft.mu.Unlock()
		defer func() { ft.mu.Lock(); ft.lose = nil; ft.mu.Unlock() }()

		spec := launchSpec("no-move", "t3.small", "t3a.small")
		insts, err := p.Launch(ctx, spec, 1)
		if err != nil {
			t.Fatal(err)
		}
		if insts[0].Type != "t3.small" {
			t.Errorf("launched %s, want t3.small (the offering whose answer was lost)", insts[0].Type)
		}
		if n := srv.Launches(clientToken("no-move", offering{Type: "t3a.small"})); n != 0 {
			t.Errorf("the second offering launched %d times after a lost answer, want 0", n)
		}
	})
}

// TestLaunchUnknownOutcome: when even the SDK's retries never get an
// answer, Launch asks again with the same offering and token, and in the
// end fails without moving to another offering.
func TestLaunchUnknownOutcome(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ft := newFaultyTransport()
	p := newProvider(t, srv, func(o *Options) {
		o.HTTPClient = &http.Client{Transport: ft}
		o.backoff = func(int) time.Duration { return time.Millisecond }
		o.RateLimits = &RateLimits{} // 42 RunInstances need not take 20s
	})
	ctx := testCtx(t)
	spec := func(token string) cloud.LaunchSpec { return launchSpec(token, "t3.small", "t3a.small") }

	// One SDK round of lost answers, then an answer.
	ft.lose = func(action string, n int) bool { return action == "RunInstances" && n <= maxAttempts+1 }
	insts, err := p.Launch(ctx, spec("unknown-1"), 1)
	if err != nil {
		t.Fatal(err)
	}
	if got := ft.count("RunInstances"); got != maxAttempts+2 {
		t.Errorf("RunInstances sent %d times, want %d", got, maxAttempts+2)
	}
	if insts[0].Type != "t3.small" || srv.Running() != 1 || srv.Launches(clientToken("unknown-1", offering{Type: "t3.small"})) != 1 {
		t.Errorf("launched %s; %d running; want one t3.small launched once", insts[0].Type, srv.Running())
	}

	// No answer ever: an error that is no capacity error, and no second
	// offering tried.
	ft.mu.Lock()
	before := ft.seen["RunInstances"]
	ft.lose = func(action string, n int) bool { return action == "RunInstances" }
	ft.mu.Unlock()
	_, err = p.Launch(ctx, spec("unknown-2"), 1)
	if err == nil || errors.Is(err, cloud.ErrCapacity) {
		t.Fatalf("Launch without answers: %v, want an error that is not ErrCapacity", err)
	}
	if got := ft.count("RunInstances") - before; got != launchRounds*maxAttempts {
		t.Errorf("RunInstances sent %d times, want %d", got, launchRounds*maxAttempts)
	}
	if n := srv.Launches(clientToken("unknown-2", offering{Type: "t3a.small"})); n != 0 {
		t.Errorf("the second offering launched %d times", n)
	}
	if srv.Running() != 2 {
		t.Errorf("%d running, want 2 (each token launched once)", srv.Running())
	}
}

// TestLaunchWithoutTokenFilter: on a cloud that lacks DescribeInstances'
// client-token filter, launches still work (finding earlier launches by
// tag), and stop asking the filter after the first refusal.
func TestLaunchWithoutTokenFilter(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ft := newFaultyTransport()
	ft.reject["client-token"] = "InvalidParameterValue"
	p := newProvider(t, srv, func(o *Options) { o.HTTPClient = &http.Client{Transport: ft} })
	ctx := testCtx(t)
	for _, token := range []string{"nf-1", "nf-2"} {
		if _, err := p.Launch(ctx, launchSpec(token, "t3.small", "t3a.small"), 1); err != nil {
			t.Fatal(err)
		}
	}
	if got := ft.sent("DescribeInstances", "client-token"); got != 1 {
		t.Errorf("client-token asked %d times, want 1 (refused once, then not asked)", got)
	}
	if got := ft.count("DescribeInstances"); got != 3 {
		t.Errorf("%d DescribeInstances, want 3 (a tag lookup each, one refused client-token lookup)", got)
	}
}

// TestLaunchAfterCrash: a launch fell back to its second offering, which
// launched, but the caller never heard (it crashed). After a restart, with
// the offering memory gone and capacity back on the first offering, the
// retry must find the instance instead of launching a second one.
func TestLaunchAfterCrash(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ctx := testCtx(t)
	spec := launchSpec("crash", "t3.small", "t3a.small")

	full := true
	var mu sync.Mutex
	srv.SetCapacity(func(typ, zone, market string) string {
		mu.Lock()
		defer mu.Unlock()
		if full && typ == "t3.small" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	ft := newFaultyTransport()
	ft.lose = func(action string, n int) bool { return action == "RunInstances" && n >= 2 }
	crashed := newProvider(t, srv, func(o *Options) { o.HTTPClient = &http.Client{Transport: ft} })
	cctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	_, err := crashed.Launch(cctx, spec, 1)
	cancel()
	if err == nil || errors.Is(err, cloud.ErrCapacity) {
		t.Fatalf("first Launch: %v, want an error that is not a capacity error", err)
	}
	if srv.Running() != 1 {
		t.Fatalf("%d instances running after the lost launch, want 1", srv.Running())
	}

	mu.Lock()
	full = false
	mu.Unlock()
	restarted := newProvider(t, srv, nil)
	insts, err := restarted.Launch(ctx, spec, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(insts) != 1 || insts[0].Type != "t3a.small" {
		t.Errorf("Launch after restart returned %+v, want the t3a.small launched before", insts)
	}
	if n := srv.Running(); n != 1 {
		t.Errorf("%d instances running, want 1: the retry launched again", n)
	}
	if n := srv.Launches(clientToken("crash", offering{Type: "t3.small"})); n != 0 {
		t.Errorf("the first offering launched %d times, want 0", n)
	}
}

func TestCapacityFallback(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{Zones: []string{"us-east-1a", "us-east-1b"}})
	var mu sync.Mutex
	var asked []string
	codes := map[string]string{
		"t3.small/us-east-1a/spot":       "InsufficientInstanceCapacity",
		"t3.small/us-east-1a/on-demand":  "InsufficientInstanceCapacity",
		"t3.small/us-east-1b/spot":       "SpotMaxPriceTooLow",
		"t3.small/us-east-1b/on-demand":  "Unsupported",
		"t3a.small/us-east-1a/spot":      "MaxSpotInstanceCountExceeded",
		"t3a.small/us-east-1a/on-demand": "", // the first with room
		"t3a.small/us-east-1b/spot":      "",
		"t3a.small/us-east-1b/on-demand": "",
	}
	srv.SetCapacity(func(typ, zone, market string) string {
		mu.Lock()
		defer mu.Unlock()
		k := typ + "/" + zone + "/" + market
		asked = append(asked, k)
		return codes[k]
	})
	takeAsked := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := asked
		asked = nil
		return out
	}
	// No rate limits: the memory's second must not run out while
	// launches wait for the RunInstances bucket.
	p := newProvider(t, srv, func(o *Options) { o.CapacityRetry = time.Second; o.RateLimits = &RateLimits{} })
	ctx := testCtx(t)
	spec := func(token string) cloud.LaunchSpec {
		s := launchSpec(token, "t3.small", "t3a.small")
		s.Zones = []string{"us-east-1a", "us-east-1b"}
		s.Spot = "prefer"
		return s
	}

	insts, err := p.Launch(ctx, spec("fb-1"), 1)
	if err != nil {
		t.Fatal(err)
	}
	if insts[0].Type != "t3a.small" || insts[0].Zone != "us-east-1a" || serverInstance(t, srv, insts[0].ID).Market != "on-demand" {
		t.Errorf("launched %s in %s, want t3a.small on-demand in us-east-1a", insts[0].Type, insts[0].Zone)
	}
	want := []string{
		"t3.small/us-east-1a/spot", "t3.small/us-east-1a/on-demand",
		"t3.small/us-east-1b/spot", "t3.small/us-east-1b/on-demand",
		"t3a.small/us-east-1a/spot", "t3a.small/us-east-1a/on-demand",
	}
	if got := takeAsked(); !slices.Equal(got, want) {
		t.Errorf("offerings tried:\n%s\nwant (each once: a capacity error is not retried)\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// The failed offerings are remembered: the next launch goes straight
	// to the one that worked.
	if _, err := p.Launch(ctx, spec("fb-2"), 1); err != nil {
		t.Fatal(err)
	}
	if got := takeAsked(); !slices.Equal(got, want[5:]) {
		t.Errorf("second launch tried %v, want only %v", got, want[5:])
	}

	// Once the memory's time is up, the better offerings get another try.
	mu.Lock()
	codes["t3.small/us-east-1a/spot"] = ""
	mu.Unlock()
	time.Sleep(1100 * time.Millisecond)
	insts, err = p.Launch(ctx, spec("fb-3"), 1)
	if err != nil {
		t.Fatal(err)
	}
	if insts[0].Type != "t3.small" || serverInstance(t, srv, insts[0].ID).Market != "spot" {
		t.Errorf("after the memory expired, launched %s, want t3.small spot", insts[0].Type)
	}
	takeAsked()

	// Nothing has room: ErrCapacity, naming every offering's code.
	mu.Lock()
	for k := range codes {
		codes[k] = "InsufficientInstanceCapacity"
	}
	mu.Unlock()
	time.Sleep(1100 * time.Millisecond)
	_, err = p.Launch(ctx, spec("fb-4"), 1)
	wantErrIs(t, err, cloud.ErrCapacity)
	if errors.Is(err, cloud.ErrQuota) || !strings.Contains(err.Error(), "InsufficientInstanceCapacity") {
		t.Errorf("capacity error %q", err)
	}
	if got := len(takeAsked()); got != 8 {
		t.Errorf("%d offerings tried, want all 8", got)
	}
	// And while they are all remembered, a launch fails without a call.
	before := srv.Calls()["RunInstances"]
	_, err = p.Launch(ctx, spec("fb-5"), 1)
	wantErrIs(t, err, cloud.ErrCapacity)
	if got := srv.Calls()["RunInstances"] - before; got != 0 {
		t.Errorf("%d RunInstances while every offering is remembered as full, want 0", got)
	}
	if !strings.Contains(err.Error(), "8 skipped") {
		t.Errorf("error %q does not say offerings were skipped", err)
	}

	// Spot only never falls back to on-demand.
	only := spec("fb-6")
	only.Spot = "only"
	only.InstanceTypes = []string{"m7g.large"}
	srv.SetCapacity(func(typ, zone, market string) string {
		if market == "spot" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	_, err = p.Launch(ctx, only, 1)
	wantErrIs(t, err, cloud.ErrCapacity)
	if n := srv.Running(); n != 3 {
		t.Errorf("%d running, want the 3 launched before", n)
	}
}

func TestQuotaStopsLaunching(t *testing.T) {
	hermetic(t)
	for _, code := range []string{"InstanceLimitExceeded", "VcpuLimitExceeded"} {
		t.Run(code, func(t *testing.T) {
			srv := newServer(t, ec2test.Options{})
			srv.SetQuota(1, code)
			p := newProvider(t, srv, nil)
			ctx := testCtx(t)
			spec := func(token string) cloud.LaunchSpec {
				s := launchSpec(token, "t3.small", "t3a.small")
				s.Zones = []string{"us-east-1a", "us-east-1b"}
				s.Spot = "prefer"
				return s
			}
			if _, err := p.Launch(ctx, spec("q-1"), 1); err != nil {
				t.Fatal(err)
			}
			before := srv.Calls()["RunInstances"]
			_, err := p.Launch(ctx, spec("q-2"), 1)
			wantErrIs(t, err, cloud.ErrQuota)
			if errors.Is(err, cloud.ErrCapacity) {
				t.Errorf("quota error also matches ErrCapacity: %v", err)
			}
			if !strings.Contains(err.Error(), code) {
				t.Errorf("error %q lacks EC2's code", err)
			}
			if got := srv.Calls()["RunInstances"] - before; got != 1 {
				t.Errorf("%d RunInstances after a quota error, want 1: other offerings hit the same quota", got)
			}
			if srv.Running() != 1 {
				t.Errorf("%d running, want 1", srv.Running())
			}
		})
	}
}

func TestImageResolution(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	day := func(m time.Month) time.Time { return time.Date(2026, m, 1, 0, 0, 0, 0, time.UTC) }
	srv.AddImage(ec2test.Image{ID: "ami-00000000000000001", Name: "hangar-ci-jan", Owner: "123456789012", Created: day(1)})
	srv.AddImage(ec2test.Image{ID: "ami-00000000000000003", Name: "hangar-ci-mar", Owner: "123456789012", Created: day(3)})
	srv.AddImage(ec2test.Image{ID: "ami-00000000000000002", Name: "hangar-ci-feb", Owner: "123456789012", Created: day(2)})
	srv.AddImage(ec2test.Image{ID: "ami-00000000000000004", Name: "hangar-ci-apr", Owner: "123456789012", Created: day(4), State: "pending"})
	srv.AddImage(ec2test.Image{ID: "ami-00000000000000009", Name: "hangar-ci-dec", Owner: "999999999999", Created: day(12)})
	// No rate limits: the cache's TTL must not run out while launches wait.
	p := newProvider(t, srv, func(o *Options) { o.ImageCacheTTL = time.Second; o.RateLimits = &RateLimits{} })
	ctx := testCtx(t)

	launchImage := func(image, token string) (string, error) {
		s := launchSpec(token)
		s.Image = image
		insts, err := p.Launch(ctx, s, 1)
		if err != nil {
			return "", err
		}
		return insts[0].Image, nil
	}
	describes := func() int { return srv.Calls()["DescribeImages"] }

	// Ten launches at once resolve the pattern with one DescribeImages.
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := range 10 {
		wg.Go(func() {
			got, err := launchImage("hangar-ci-*", fmt.Sprintf("img-%d", i))
			if err == nil && got != "ami-00000000000000003" {
				err = fmt.Errorf("launched %s, want the newest available own image ami-00000000000000003", got)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := describes(); n != 1 {
		t.Errorf("%d DescribeImages for ten launches of one pattern, want 1", n)
	}

	// Owners before the colon; a new image shows after the cache's TTL.
	if got, err := launchImage("999999999999:hangar-ci-*", "img-owner"); err != nil || got != "ami-00000000000000009" {
		t.Errorf("owner pattern launched %s, %v; want ami-00000000000000009", got, err)
	}
	srv.AddImage(ec2test.Image{ID: "ami-00000000000000005", Name: "hangar-ci-may", Owner: "123456789012", Created: day(5)})
	if got, _ := launchImage("hangar-ci-*", "img-cached"); got != "ami-00000000000000003" {
		t.Errorf("within the TTL launched %s, want the cached ami-00000000000000003", got)
	}
	time.Sleep(1100 * time.Millisecond)
	if got, _ := launchImage("hangar-ci-*", "img-fresh"); got != "ami-00000000000000005" {
		t.Errorf("after the TTL launched %s, want the new ami-00000000000000005", got)
	}

	// An id needs no DescribeImages, unless the root volume is resized.
	before := describes()
	if got, err := launchImage("ami-00000000000000002", "img-id"); err != nil || got != "ami-00000000000000002" {
		t.Errorf("image id launched %s, %v", got, err)
	}
	if n := describes() - before; n != 0 {
		t.Errorf("%d DescribeImages for an image id, want 0", n)
	}

	_, err := launchImage("no-such-image-*", "img-none")
	wantErrIs(t, err, cloud.ErrNotFound)
	_, err = launchImage("ami-0000000000000dead", "img-dead")
	if err == nil {
		t.Error("launching an unknown image id: no error")
	}
	s := launchSpec("img-dead-root")
	s.Image, s.RootVolumeGB = "ami-0000000000000dead", 20
	_, err = p.Launch(ctx, s, 1)
	wantErrIs(t, err, cloud.ErrNotFound)
}

// TestLaunchRetryAfterUnknownOutcomeOnFullOffering: a launch's answer on
// its first offering is lost; before the pool retries, another launch
// finds that offering full, so the offering memory says to skip it, and
// EC2 does not list the instance yet (eventual consistency), so the
// client-token check finds nothing. The retry must ask the first offering
// again with its token, not launch a second instance on the next one.
func TestLaunchRetryAfterUnknownOutcomeOnFullOffering(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.HideNewFor(time.Minute)
	ft := newFaultyTransport()
	p := newProvider(t, srv, func(o *Options) {
		o.HTTPClient = &http.Client{Transport: ft}
		o.backoff = func(int) time.Duration { return time.Millisecond }
		o.RateLimits = &RateLimits{}
	})
	ctx := testCtx(t)
	spec := func(token string) cloud.LaunchSpec { return launchSpec(token, "t3.small", "t3a.small") }

	ft.lose = func(action string, n int) bool { return action == "RunInstances" }
	if _, err := p.Launch(ctx, spec("unsure"), 1); err == nil || errors.Is(err, cloud.ErrCapacity) {
		t.Fatalf("Launch without answers: %v, want an error that is not ErrCapacity", err)
	}
	ft.mu.Lock()
	ft.lose = nil
	ft.mu.Unlock()
	if n := srv.Launches(clientToken("unsure", offering{Type: "t3.small"})); n != 1 {
		t.Fatalf("first offering launched %d times, want 1", n)
	}

	srv.SetCapacity(func(typ, zone, market string) string {
		if typ == "t3.small" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	if _, err := p.Launch(ctx, spec("other"), 1); err != nil {
		t.Fatal(err)
	}

	insts, err := p.Launch(ctx, spec("unsure"), 1)
	if err != nil {
		t.Fatal(err)
	}
	if n := srv.Launches(clientToken("unsure", offering{Type: "t3a.small"})); n != 0 {
		t.Errorf("the retry launched a second instance on t3a.small (%d launches)", n)
	}
	if len(insts) != 1 || insts[0].Type != "t3.small" {
		t.Errorf("retry returned %+v, want the t3.small launched before", insts)
	}
}
