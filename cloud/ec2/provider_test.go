package ec2

// Listing, batches, console, throttling, metrics and configuration through
// the real SDK against ec2test.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
)

func TestListPaginatesAndBatches(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, func(o *Options) {
		// EC2 ends 20 instances a second once 1000 are spent; the test
		// counts calls and need not wait for that.
		lim := DefaultRateLimits()
		lim.TerminatedInstances = Bucket{}
		o.RateLimits = &lim
	})
	ctx := testCtx(t)

	const n = 1203
	insts, err := p.Launch(ctx, launchSpec("many"), n)
	if err != nil {
		t.Fatal(err)
	}
	if len(insts) != n {
		t.Fatalf("Launch returned %d instances, want %d", len(insts), n)
	}
	others := launchSpec("others")
	others.Tags = map[string]string{cloud.TagPool: "other"}
	if _, err := p.Launch(ctx, others, 3); err != nil {
		t.Fatal(err)
	}

	before := srv.Calls()["DescribeInstances"]
	listed, err := p.List(ctx, map[string]string{cloud.TagPool: "p"})
	if err != nil {
		t.Fatal(err)
	}
	if got := srv.Calls()["DescribeInstances"] - before; got != 2 {
		t.Errorf("List of %d instances sent %d DescribeInstances, want 2 pages of at most 1000", n, got)
	}
	want := instanceIDs(insts)
	slices.Sort(want)
	got := instanceIDs(listed)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("List returned %d instances, want the %d launched (and not the other pool's)", len(got), len(want))
	}
	all, err := p.List(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != n+3 {
		t.Errorf("List(nil) returned %d, want %d", len(all), n+3)
	}

	// Terminating them all takes two batches, and one more call for the
	// batch EC2 refused over an unknown id.
	before = srv.Calls()["TerminateInstances"]
	unknown := "i-0000000000000000f"
	done, err := p.Terminate(ctx, append(instanceIDs(insts), unknown))
	if err != nil {
		t.Fatal(err)
	}
	if len(done) != n+1 || !slices.Contains(done, unknown) {
		t.Errorf("Terminate returned %d ids, want %d with the unknown one counted as ended", len(done), n+1)
	}
	if got := srv.Calls()["TerminateInstances"] - before; got != 3 {
		t.Errorf("%d TerminateInstances for %d ids and one unknown, want 3", got, n)
	}
	if srv.Running() != 3 {
		t.Errorf("%d running after terminating the pool, want the other pool's 3", srv.Running())
	}
	listed, err = p.List(ctx, map[string]string{cloud.TagPool: "p"})
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range listed {
		if in.State != cloud.StateTerminated && in.State != cloud.StateTerminating {
			t.Fatalf("%s is %s after Terminate", in.ID, in.State)
		}
	}
}

// TestListTagValuesAreLiteral: EC2 reads * and ? in filter values as
// wildcards; a tag value must match only itself (the filter escapes
// them, and List checks the tags again on its side).
func TestListTagValuesAreLiteral(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)
	for token, v := range map[string]string{"lit-1": "r*d", "lit-2": "red", "lit-3": `r\d?`} {
		s := launchSpec(token)
		s.Tags = map[string]string{"color": v}
		if _, err := p.Launch(ctx, s, 1); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range []string{"r*d", "red", `r\d?`} {
		got, err := p.List(ctx, map[string]string{"color": v})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].Tags["color"] != v {
			t.Errorf("List(color=%q) = %+v, want the one instance tagged so", v, got)
		}
	}
}

func TestPartialSuccess(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)

	insts, err := p.Launch(ctx, launchSpec("partial"), 2)
	if err != nil {
		t.Fatal(err)
	}
	spotSpec := launchSpec("partial-spot")
	spotSpec.Spot = "only"
	spot, err := p.Launch(ctx, spotSpec, 1)
	if err != nil {
		t.Fatal(err)
	}
	a, b, s := insts[0].ID, insts[1].ID, spot[0].ID
	unknown := "i-0000000000000000f"
	malformed := "i-nothex"

	done, err := p.Stop(ctx, []string{a, unknown, b, s, malformed})
	wantErrIs(t, err, cloud.ErrNotFound)
	if !slices.Equal(done, sorted(a, b)) {
		t.Errorf("Stop returned %v, want %v", done, sorted(a, b))
	}
	for _, bad := range []string{unknown, s, "UnsupportedOperation", malformed} {
		if !strings.Contains(err.Error(), bad) {
			t.Errorf("Stop error does not mention %s: %v", bad, err)
		}
	}
	if strings.Contains(err.Error(), a) || strings.Contains(err.Error(), b) {
		t.Errorf("Stop error mentions an instance that stopped: %v", err)
	}
	for _, id := range []string{a, b} {
		if st := serverInstance(t, srv, id).State; st != "stopped" && st != "stopping" {
			t.Errorf("%s is %s after Stop, want stopped", id, st)
		}
	}

	done, err = p.Start(ctx, []string{unknown, a, b})
	wantErrIs(t, err, cloud.ErrNotFound)
	if !slices.Equal(done, sorted(a, b)) {
		t.Errorf("Start returned %v, want %v", done, sorted(a, b))
	}

	done, err = p.Terminate(ctx, []string{a, unknown, malformed})
	if err != nil {
		t.Errorf("Terminate with unknown ids: %v, want none (an unknown id counts as ended)", err)
	}
	if !slices.Equal(done, sorted(a, unknown, malformed)) {
		t.Errorf("Terminate returned %v, want %v", done, sorted(a, unknown, malformed))
	}
}

func sorted(ids ...string) []string {
	slices.Sort(ids)
	return ids
}

// TestEventualConsistency: EC2 may deny knowing an instance for a moment
// after launching it. Terminating it then must not count as done, or the
// instance would run on unseen.
func TestEventualConsistency(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.HideNewFor(time.Second)
	p := newProvider(t, srv, nil)
	ctx := testCtx(t)

	insts, err := p.Launch(ctx, launchSpec("hidden"), 1)
	if err != nil {
		t.Fatal(err)
	}
	id := insts[0].ID
	listed, err := p.List(ctx, map[string]string{cloud.TagIntent: "hidden"})
	if err != nil || len(listed) != 0 {
		t.Fatalf("List right after launch = %v, %v; want nothing (ec2test hides it)", listed, err)
	}
	done, err := p.Terminate(ctx, []string{id})
	if err == nil || len(done) != 0 {
		t.Fatalf("Terminate of a just-launched, not yet visible instance = %v, %v; want an error and nothing done", done, err)
	}
	if !strings.Contains(err.Error(), "eventual consistency") {
		t.Errorf("error %q does not say why", err)
	}
	if srv.Running() != 1 {
		t.Fatal("the instance is gone")
	}
	time.Sleep(time.Second)
	done, err = p.Terminate(ctx, []string{id})
	if err != nil || !slices.Equal(done, []string{id}) {
		t.Errorf("Terminate once visible = %v, %v", done, err)
	}
	if srv.Running() != 0 {
		t.Errorf("%d running after Terminate, want 0", srv.Running())
	}
}

func TestConsoleOutput(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ft := newFaultyTransport()
	p := newProvider(t, srv, func(o *Options) { o.HTTPClient = &http.Client{Transport: ft} })
	ctx := testCtx(t)
	insts, err := p.Launch(ctx, launchSpec("console"), 1)
	if err != nil {
		t.Fatal(err)
	}
	id := insts[0].ID
	out, err := p.ConsoleOutput(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if want := "ec2test: " + id; !strings.Contains(string(out), want) {
		t.Errorf("console = %q, want it decoded and to contain %q", out, want)
	}

	// A cloud without Latest: the call is repeated without it.
	ft.mu.Lock()
	ft.reject["Latest=true"] = "UnknownParameter"
	ft.mu.Unlock()
	before := ft.count("GetConsoleOutput")
	out, err = p.ConsoleOutput(ctx, id)
	if err != nil {
		t.Fatalf("ConsoleOutput where Latest is unknown: %v", err)
	}
	if !strings.Contains(string(out), id) || ft.count("GetConsoleOutput")-before != 2 {
		t.Errorf("console = %q after %d calls, want it after 2", out, ft.count("GetConsoleOutput")-before)
	}

	_, err = p.ConsoleOutput(ctx, "i-0000000000000000f")
	wantErrIs(t, err, cloud.ErrNotFound)
}

// TestThrottling: with 30% of all requests answered RequestLimitExceeded,
// a burst of launches, listings and terminations still all succeeds, no
// token launches twice, and the throttles show in the observed metrics.
func TestThrottling(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	srv.Throttle("", 0.3)
	srv.SetCapacity(func(typ, zone, market string) string {
		if typ == "t3.small" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	obs := newObserver()
	p := newProvider(t, srv, func(o *Options) {
		o.Observe = obs.observe
		// Ten times AWS's default buckets: the test is about riding out
		// throttles, not about waiting for the buckets.
		lim := DefaultRateLimits()
		lim.RunInstances = Bucket{Size: 50, PerSecond: 20}
		lim.NonMutating = Bucket{Size: 1000, PerSecond: 200}
		o.RateLimits = &lim
		// The SDK's backoff (up to 2^attempt seconds) makes this test take
		// 7 to 20 seconds; TestConformance runs with it. Here a short one
		// does, while the SDK still decides what to retry.
		o.backoff = func(attempt int) time.Duration { return time.Duration(attempt) * 20 * time.Millisecond }
	})
	ctx := testCtx(t)

	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, 3*n)
	ids := make(chan string, n)
	for i := range n {
		wg.Go(func() {
			insts, err := p.Launch(ctx, launchSpec(fmt.Sprintf("thr-%d", i), "t3.small", "t3a.small"), 1)
			if err != nil {
				errs <- fmt.Errorf("launch %d: %w", i, err)
				return
			}
			ids <- insts[0].ID
			if _, err := p.List(ctx, map[string]string{cloud.TagPool: "p"}); err != nil {
				errs <- fmt.Errorf("list %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(ids)
	var all []string
	for id := range ids {
		all = append(all, id)
	}
	if _, err := p.Terminate(ctx, all); err != nil {
		errs <- err
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := srv.PeakRunning(); got != n {
		t.Errorf("peak %d running, want %d: a launch was repeated", got, n)
	}
	for i := range n {
		for _, typ := range []string{"t3.small", "t3a.small"} {
			if l := srv.Launches(clientToken(fmt.Sprintf("thr-%d", i), offering{Type: typ})); l > 1 {
				t.Errorf("token thr-%d launched %d times on %s", i, l, typ)
			}
		}
	}
	calls, codes := obs.snapshot()
	serverCalls := srv.Calls()
	for action, c := range serverCalls {
		if calls[action] != c {
			t.Errorf("observed %d %s requests, ec2test counted %d", calls[action], action, c)
		}
	}
	throttled := 0
	for k, c := range srv.Errors() {
		if strings.HasSuffix(k, "/RequestLimitExceeded") {
			throttled += c
			if codes[k] != c {
				t.Errorf("observed %d %s, ec2test sent %d", codes[k], k, c)
			}
		}
	}
	if throttled == 0 {
		t.Error("nothing was throttled")
	}
	t.Logf("requests %v; throttled %d", serverCalls, throttled)
}

func TestRateLimitsPace(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, func(o *Options) {
		lim := DefaultRateLimits()
		lim.NonMutating = Bucket{Size: 2, PerSecond: 20}
		o.RateLimits = &lim
	})
	ctx := testCtx(t)
	start := time.Now()
	for range 12 {
		if _, err := p.List(ctx, nil); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(start); d < 450*time.Millisecond {
		t.Errorf("12 listings through a bucket of 2 refilling 20/s took %s, want at least 500ms", d)
	}
}

func TestRateLimitWaitCanceled(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	p := newProvider(t, srv, func(o *Options) {
		lim := DefaultRateLimits()
		lim.NonMutating = Bucket{Size: 1, PerSecond: 0.1}
		o.RateLimits = &lim
	})
	ctx := testCtx(t)
	if _, err := p.List(ctx, nil); err != nil {
		t.Fatal(err)
	}
	before := srv.Calls()["DescribeInstances"]
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err := p.List(cctx, nil)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "DescribeInstances request rate limit") {
		t.Errorf("List that cannot get a token before its deadline: %v", err)
	}
	if got := srv.Calls()["DescribeInstances"] - before; got != 0 {
		t.Errorf("%d requests sent without a token", got)
	}
}

// TestConfigurationChain: region and credentials from the SDK's default
// chain (a profile in a shared config file, environment variables).
func TestConfigurationChain(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{Region: "eu-west-1"})
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "config")
	profile := "[profile ci]\nregion = eu-west-1\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = from-profile\n"
	if err := os.WriteFile(cfgFile, []byte(profile), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_CONFIG_FILE", cfgFile)
	ctx := testCtx(t)

	p, err := New(ctx, Options{Profile: "ci", Endpoint: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.List(ctx, nil); err != nil {
		t.Errorf("List with the profile's region and credentials: %v", err)
	}

	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "from-env")
	p, err = New(ctx, Options{Region: "eu-west-1", Endpoint: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.List(ctx, nil); err != nil {
		t.Errorf("List with credentials from the environment: %v", err)
	}

	// ec2test checks the signing region, as EC2 does.
	p, err = New(ctx, Options{Region: "us-west-2", Endpoint: srv.URL()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.List(ctx, nil); err == nil || !strings.Contains(err.Error(), "AuthFailure") {
		t.Errorf("List signed for another region: %v, want AuthFailure", err)
	}

	if _, err := New(ctx, Options{Endpoint: srv.URL()}); err == nil || !strings.Contains(err.Error(), "no region") {
		t.Errorf("New without any region: %v, want an error saying so", err)
	}
}

// TestBatchesCanceledBetweenCalls: when the context ends between two
// batches of more than maxBatch ids, the ids never sent must come back as
// an error, not as a silent success.
func TestBatchesCanceledBetweenCalls(t *testing.T) {
	hermetic(t)
	srv := newServer(t, ec2test.Options{})
	ctx, cancel := context.WithCancel(testCtx(t))
	defer cancel()
	p := newProvider(t, srv, func(o *Options) {
		o.RateLimits = &RateLimits{}
		o.Observe = func(action, code string, d time.Duration) {
			if action == "TerminateInstances" {
				cancel()
			}
		}
	})
	ids := make([]string, maxBatch+1)
	for i := range ids {
		ids[i] = fmt.Sprintf("i-%017x", i+1)
	}
	done, err := p.Terminate(ctx, ids)
	if len(done) == len(ids) {
		t.Fatalf("all %d ids done; the test did not cancel between batches", len(done))
	}
	if err == nil {
		t.Errorf("Terminate returned %d of %d ids done and no error", len(done), len(ids))
	} else if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v, want one matching context.Canceled", err)
	}
}
