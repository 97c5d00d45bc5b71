package main

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// A cold lease boots an instance whose user-data really runs, fetches the
// bootstrap script with its token, reports ready and gets its password only
// through the assignment.
func TestColdLease(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	lease := ts.lease(t, api.LeaseRequest{Pool: "demo", Worker: pool.Worker{Name: "w1", Master: "ci.example:9989"}})
	if lease.Instance == nil || !strings.HasPrefix(lease.Instance.ID, "i-") || !strings.HasPrefix(lease.Instance.PrivateIP, "127.") {
		t.Fatalf("lease instance = %+v", lease.Instance)
	}
	pw := lease.Worker.Password
	if len(pw) < 22 {
		t.Fatalf("instance password %d characters; want at least 128 bits", len(pw))
	}
	env := ts.workerEnv(t, lease.Instance.ID)
	want := map[string]string{
		"HANGAR_LEASE_ID":        lease.ID,
		"HANGAR_WORKER_NAME":     "w1",
		"HANGAR_WORKER_MASTER":   "ci.example:9989",
		"HANGAR_WORKER_PASSWORD": pw,
	}
	for k, v := range want {
		if env[k] != v {
			t.Errorf("worker env %s = %q, want %q", k, env[k], v)
		}
	}
	console, err := ts.client.Console(context.Background(), lease.Instance.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"hangar-userdata: running the bootstrap script of pool demo", "reported ready", "worker started for lease " + lease.ID} {
		if !strings.Contains(console, s) {
			t.Errorf("console lacks %q:\n%s", s, console)
		}
	}
	// The password is nowhere but in the worker's environment and the lease.
	instDir := filepath.Join(ts.dataDir, "local", "instances", lease.Instance.ID)
	// The func never fails the walk: what cannot be read is skipped.
	_ = filepath.Walk(instDir, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() || filepath.Base(path) == "worker.env" {
			return nil
		}
		if b, _ := os.ReadFile(path); strings.Contains(string(b), pw) {
			t.Errorf("password found in %s", path)
		}
		return nil
	})
	if strings.Contains(console, pw) || strings.Contains(ts.logs.String(), pw) || strings.Contains(scrape(t, ts.url), pw) {
		t.Error("password found in console, server log or metrics")
	}
	if m := scrape(t, ts.url); !strings.Contains(m, `hangar_lease_wait_seconds_count{kind="cold",pool="demo"} 1`) {
		t.Errorf("metrics lack one cold lease wait:\n%s", grepLines(m, "hangar_lease_wait"))
	}
}

// Warm leases take an idle instance; release reuses it after its worker
// stops; max_uses and discard terminate it.
func TestWarmLeaseReuseDiscard(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", "min_idle = 1\nmax_uses = 2"), nil)
	ctx := context.Background()
	testutil.Eventually(t, "a warm spare", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 1 })

	first := ts.lease(t, api.LeaseRequest{Pool: "demo", Wait: "0s"})
	id := first.Instance.ID
	if ts.workerEnv(t, id)["HANGAR_LEASE_ID"] != first.ID {
		t.Fatal("worker not started for the first lease")
	}
	// min_idle refills the pool behind the lease.
	testutil.Eventually(t, "a new warm spare", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 1 })
	if err := ts.client.Release(ctx, first.ID, false); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the released instance to be idle", 30*time.Second, func() bool {
		for _, in := range ts.instances(t, "demo") {
			if in.ID == id {
				return in.State == pool.Idle
			}
		}
		return false
	})
	if err := os.Remove(filepath.Join(ts.dataDir, "local", "instances", id, "disk", "worker.env")); err != nil {
		t.Fatal(err)
	}
	// The most recently idle instance goes first: the one just released.
	second := ts.lease(t, api.LeaseRequest{Pool: "demo", Wait: "0s"})
	if second.Instance.ID != id {
		t.Fatalf("second lease got %s, want the reused %s", second.Instance.ID, id)
	}
	if ts.workerEnv(t, id)["HANGAR_LEASE_ID"] != second.ID {
		t.Fatal("worker not restarted for the second lease")
	}
	if got, _ := ts.client.GetLease(ctx, first.ID, 0); got.State != pool.LeaseReleased {
		t.Errorf("first lease is %s, want released", got.State)
	}
	// Its second use was its last (max_uses = 2).
	if err := ts.client.Release(ctx, second.ID, false); err != nil {
		t.Fatal(err)
	}
	waitGone(t, ts, id)

	third := ts.lease(t, api.LeaseRequest{Pool: "demo", Wait: "30s"})
	if err := ts.client.Release(ctx, third.ID, true); err != nil {
		t.Fatal(err)
	}
	waitGone(t, ts, third.Instance.ID)
	m := scrape(t, ts.url)
	for _, want := range []string{`hangar_reaped_instances_total{pool="demo",reason="max_uses"} 1`, `hangar_reaped_instances_total{pool="demo",reason="discard"} 1`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(m, "hangar_reaped"))
		}
	}
	for _, family := range []string{
		`hangar_instances{pool="demo",state="idle"} `,
		`hangar_leases_active{pool="demo"} 0`,
		`hangar_leases_pending{pool="demo"} 0`,
		`hangar_lease_wait_seconds_count{kind="warm",pool="demo"} `,
		`hangar_boot_seconds_count{pool="demo"}`,
		`hangar_cloud_api_calls_total{operation="launch",outcome="ok",provider="local"}`,
		`hangar_cloud_api_calls_total{operation="terminate",outcome="ok",provider="local"}`,
		`hangar_cloud_api_seconds_bucket{operation="list",provider="local"`,
		`hangar_instance_seconds_total{pool="demo",state="leased"}`,
		`hangar_instance_seconds_total{pool="demo",state="idle"}`,
	} {
		if !strings.Contains(m, family) {
			t.Errorf("metrics lack %s", family)
		}
	}
	// Releasing twice is harmless.
	if err := ts.client.Release(ctx, third.ID, true); err != nil {
		t.Errorf("second release: %v", err)
	}
}

// waitGone waits until the instance is no longer listed and its processes
// have ended.
func waitGone(t *testing.T, ts *testServer, id string) {
	t.Helper()
	testutil.Eventually(t, id+" to be terminated", 30*time.Second, func() bool {
		for _, in := range ts.instances(t, "") {
			if in.ID == id {
				return false
			}
		}
		return len(instanceProcs(id)) == 0
	})
}

// Idle instances above min_idle are reaped after idle_ttd; with on_idle =
// "stop" they are stopped and started again before anything is launched.
func TestIdleReaping(t *testing.T) {
	for _, onIdle := range []string{"terminate", "stop"} {
		t.Run(onIdle, func(t *testing.T) {
			clock := newFakeClock()
			ts := startTest(t, testTOML(t.TempDir(), "demo", `min_idle = 1
on_idle = "`+onIdle+`"`), clock)
			ctx := context.Background()
			a := ts.lease(t, api.LeaseRequest{Pool: "demo"})
			b := ts.lease(t, api.LeaseRequest{Pool: "demo"})
			for _, l := range []pool.LeaseView{a, b} {
				if err := ts.client.Release(ctx, l.ID, false); err != nil {
					t.Fatal(err)
				}
			}
			testutil.Eventually(t, "3 idle instances", 30*time.Second, func() bool { return ts.countState(t, "demo", pool.Idle) == 3 })

			clock.Advance(4 * time.Minute)
			time.Sleep(200 * time.Millisecond) // a few ticks: nothing is due yet
			if n := ts.countState(t, "demo", pool.Idle); n != 3 {
				t.Fatalf("%d idle before idle_ttd, want 3", n)
			}
			clock.Advance(2 * time.Minute)
			reaped := pool.Gone
			if onIdle == "stop" {
				reaped = pool.Stopped
			}
			testutil.Eventually(t, "reaping down to min_idle", 30*time.Second, func() bool {
				return ts.countState(t, "demo", pool.Idle) == 1 && (reaped == pool.Gone && len(ts.instances(t, "demo")) == 1 || ts.countState(t, "demo", reaped) == 2)
			})
			if !strings.Contains(scrape(t, ts.url), `hangar_reaped_instances_total{pool="demo",reason="idle_ttd"} 2`) {
				t.Error("metrics lack 2 idle_ttd reapings")
			}
			if onIdle != "stop" {
				return
			}
			for _, in := range ts.instances(t, "demo") {
				if in.State == pool.Stopped && len(instanceProcs(in.ID)) > 0 {
					t.Errorf("stopped instance %s still has processes", in.ID)
				}
			}
			known := map[string]bool{}
			for _, in := range ts.instances(t, "demo") {
				known[in.ID] = true
			}
			// Taking the idle one makes min_idle ask for another: a stopped
			// one is started, nothing is launched.
			ts.lease(t, api.LeaseRequest{Pool: "demo"})
			testutil.Eventually(t, "a stopped instance started as the new spare", 30*time.Second, func() bool {
				return ts.countState(t, "demo", pool.Idle) == 1 && ts.countState(t, "demo", pool.Stopped) == 1
			})
			for _, in := range ts.instances(t, "demo") {
				if !known[in.ID] {
					t.Errorf("launched %s although stopped instances were there", in.ID)
				}
			}
		})
	}
}

// An instance that does not report ready within boot_timeout is terminated
// and replaced; the lease that waited for it gets the replacement.
func TestBootTimeout(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	generic, err := os.ReadFile("../../scripts/bootstrap/generic.sh")
	if err != nil {
		t.Fatal(err)
	}
	// The first instance to boot hangs before reporting ready.
	script := "#!/bin/bash\nif mkdir \"$HANG_LOCK\" 2>/dev/null; then echo hanging; exec sleep 600; fi\n" + string(generic)
	scriptPath := filepath.Join(dir, "bootstrap.sh")
	if err := os.WriteFile(scriptPath, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	ts := startTest(t, testTOML(t.TempDir(), "demo", `bootstrap = "`+scriptPath+`"
[pools.demo.env]
HANG_LOCK = "`+filepath.Join(dir, "hang.lock")+`"`), clock)
	ctx := context.Background()
	pending, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "0s"})
	if err != nil || pending.State != pool.LeasePending {
		t.Fatalf("lease = %+v, %v; want pending", pending, err)
	}
	var hung string
	testutil.Eventually(t, "the first instance to hang", 30*time.Second, func() bool {
		list, err := ts.client.Instances(ctx, "demo")
		if err != nil {
			t.Fatalf("listing instances: %v", err)
		}
		if len(list) != 1 || list[0].State != pool.Booting {
			return false
		}
		hung = list[0].ID
		out, _ := ts.client.Console(ctx, hung)
		return strings.Contains(out, "hanging")
	})
	// The client keeps asking after its lease, so it stays queued (a
	// pending lease nobody asks after is given up after its wait + 2m).
	type result struct {
		v   pool.LeaseView
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := ts.client.GetLease(ctx, pending.ID, 60*time.Second)
		done <- result{v, err}
	}()
	testutil.Eventually(t, "the client's wait to keep the lease queued", 10*time.Second, func() bool {
		v, err := ts.client.GetLease(ctx, pending.ID, 0)
		return err == nil && v.ExpiresAt.After(clock.Now().Add(2*time.Minute+30*time.Second))
	})
	clock.Advance(2*time.Minute + time.Second)
	// The wait follows the server's clock too, so the long poll answered
	// pending as the clock passed its 60s; the client asks again.
	if r := <-done; r.err != nil {
		t.Fatal(r.err)
	}
	var got pool.LeaseView
	testutil.Eventually(t, "the lease to get the replacement", 30*time.Second, func() bool {
		got, err = ts.client.GetLease(ctx, pending.ID, 0)
		return err == nil && got.State == pool.LeaseActive
	})
	if got.Instance.ID == hung {
		t.Fatal("lease got the instance that never booted")
	}
	waitGone(t, ts, hung)
	if !strings.Contains(scrape(t, ts.url), `hangar_reaped_instances_total{pool="demo",reason="boot_timeout"} 1`) {
		t.Error("metrics lack the boot_timeout reaping")
	}
}

// max_instances holds under 50 concurrent lease requests, and every one of
// them is served in turn.
func TestMaxInstancesUnderConcurrency(t *testing.T) {
	ts := startTest(t, testTOML(t.TempDir(), "demo", ""), nil)
	prov := ts.localProvider(t)
	ctx, cancel := context.WithCancel(context.Background())
	var peak atomic.Int64
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		for ctx.Err() == nil {
			list, err := prov.List(ctx, nil)
			if err == nil {
				n := 0
				for _, in := range list {
					if in.State != cloud.StateTerminated {
						n++
					}
				}
				if int64(n) > peak.Load() {
					peak.Store(int64(n))
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	var wg sync.WaitGroup
	var served atomic.Int64
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "demo", Wait: "120s"})
			if err != nil || v.State != pool.LeaseActive {
				t.Errorf("lease: %+v, %v", v, err)
				return
			}
			served.Add(1)
			if err := ts.client.Release(ctx, v.ID, false); err != nil {
				t.Errorf("release: %v", err)
			}
		}()
	}
	wg.Wait()
	cancel()
	watch.Wait()
	if served.Load() != 50 {
		t.Errorf("%d of 50 leases served", served.Load())
	}
	if p := peak.Load(); p > 3 || p == 0 {
		t.Errorf("peak of %d instances in the cloud; max_instances is 3", p)
	}
	pools, _ := ts.client.Pools(context.Background())
	if n := total(pools[0].Instances); n > 3 {
		t.Errorf("pool counts %d instances", n)
	}
}

func total(m map[pool.State]int) int {
	n := 0
	for _, c := range m {
		n += c
	}
	return n
}

func scrape(t testing.TB, base string) string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
