package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/ec2/ec2test"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// ec2Cloud starts an EC2 test server whose instances really run on a local
// cloud, and points the AWS SDK's default chain at dummy credentials so no
// test can reach AWS.
func ec2Cloud(t *testing.T) (srv *ec2test.Server, localDir string) {
	t.Helper()
	hermeticAWS(t)
	dir := filepath.Join(t.TempDir(), "local")
	backend, err := local.New(context.Background(), local.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	srv = ec2test.New(ec2test.Options{Backend: backend})
	srv.AddImage(ec2test.Image{ID: "ami-0123456789abcdef0", Name: "hangar-worker-2026-11-01", Owner: "123456789012", Created: time.Now().Add(-time.Hour)})
	t.Cleanup(func() {
		srv.Close()
		if err := backend.Close(); err != nil {
			t.Error(err)
		}
		terminateAll(t, dir)
	})
	return srv, dir
}

// hermeticAWS gives the SDK's default chain dummy credentials and nothing
// else to find, so no test can reach AWS.
func hermeticAWS(t testing.TB) {
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           "AKIDTEST",
		"AWS_SECRET_ACCESS_KEY":       "secret",
		"AWS_SESSION_TOKEN":           "",
		"AWS_PROFILE":                 "",
		"AWS_CONFIG_FILE":             filepath.Join(t.TempDir(), "none"),
		"AWS_SHARED_CREDENTIALS_FILE": filepath.Join(t.TempDir(), "none"),
		"AWS_EC2_METADATA_DISABLED":   "true",
	} {
		t.Setenv(k, v)
	}
}

func ec2TOML(dataDir, endpoint, extra string) string {
	return fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[providers.east]
type = "ec2"
region = "us-east-1"
endpoint = %q

[pools.ci]
provider = "east"
image = "hangar-worker-*"
instance_types = ["t3.small", "t3a.small", "m5.large"]
subnets = ["subnet-us-east-1a", "subnet-us-east-1b"]
worker_command = %q
%s
`, dataDir, endpoint, workerCommand, extra)
}

// An EC2 pool pointed at the EC2 test server: a lease boots an instance
// whose user-data really runs (on the local cloud behind the test server),
// release returns it, and the reaper terminates it after idle_ttd.
func TestEC2PoolEndToEnd(t *testing.T) {
	srv, localDir := ec2Cloud(t)
	clock := newFakeClock()
	ts := startTest(t, ec2TOML(t.TempDir(), srv.URL(), "max_instances = 2\nidle_ttd = \"5m\""), clock)
	ctx := context.Background()
	l := ts.lease(t, api.LeaseRequest{Pool: "ci", Worker: pool.Worker{Name: "w1", Master: "ci.example:9989"}})
	env := readWorkerEnv(t, localDir, l.Instance.ID)
	if env["HANGAR_WORKER_PASSWORD"] != l.Worker.Password || env["HANGAR_WORKER_NAME"] != "w1" {
		t.Errorf("worker env = %v", env)
	}
	insts := srv.Instances()
	if len(insts) != 1 {
		t.Fatalf("EC2 has %d instances, want 1", len(insts))
	}
	in := insts[0]
	if in.Image != "ami-0123456789abcdef0" || in.Type != "t3.small" || in.Subnet != "subnet-us-east-1a" || in.HTTPTokens != "required" || in.HopLimit != 1 {
		t.Errorf("launched %+v", in)
	}
	for _, k := range []string{cloud.TagPool, cloud.TagOwner, cloud.TagIntent} {
		if in.Tags[k] == "" || in.VolumeTags[k] == "" {
			t.Errorf("tag %s missing on instance or volume: %v / %v", k, in.Tags, in.VolumeTags)
		}
	}
	if strings.Contains(string(in.UserData), l.Worker.Password) {
		t.Error("password in user-data")
	}
	console, err := ts.client.Console(ctx, l.Instance.ID)
	if err != nil || !strings.Contains(console, "worker started for lease "+l.ID) {
		t.Errorf("console through GetConsoleOutput: %v\n%s", err, console)
	}
	if err := ts.client.Release(ctx, l.ID, false); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, "the instance to be idle", 30*time.Second, func() bool { return ts.countState(t, "ci", pool.Idle) == 1 })
	clock.Advance(6 * time.Minute)
	testutil.Eventually(t, "the reaper to terminate it", 30*time.Second, func() bool {
		return len(ts.instances(t, "ci")) == 0 && srv.Running() == 0
	})
	if m := scrape(t, ts.url); !strings.Contains(m, `hangar_cloud_requests_total{action="RunInstances",code="ok",provider="east"} 1`) {
		t.Errorf("metrics lack the RunInstances request:\n%s", grepLines(m, "hangar_cloud_requests_total"))
	}
}

// Under 30% throttled requests and no capacity for the first two instance
// types, every lease is still served, max_instances is never exceeded, and
// no intent gets a second instance.
func TestEC2Faults(t *testing.T) {
	srv, _ := ec2Cloud(t)
	srv.Throttle("", 0.3)
	srv.SetCapacity(func(typ, zone, market string) string {
		if typ != "m5.large" {
			return "InsufficientInstanceCapacity"
		}
		return ""
	})
	ts := startTest(t, ec2TOML(t.TempDir(), srv.URL(), "max_instances = 3"), nil)
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := ts.client.Lease(ctx, api.LeaseRequest{Pool: "ci", Wait: "120s"})
			if err != nil || v.State != pool.LeaseActive {
				t.Errorf("lease: %+v, %v", v, err)
				return
			}
			if err := ts.client.Release(ctx, v.ID, false); err != nil {
				t.Errorf("release: %v", err)
			}
		}()
	}
	wg.Wait()
	if p := srv.PeakRunning(); p > 3 {
		t.Errorf("peak of %d instances; max_instances is 3", p)
	}
	perIntent := map[string]int{}
	for _, in := range srv.Instances() {
		perIntent[in.Tags[cloud.TagIntent]]++
		if in.Type != "m5.large" {
			t.Errorf("instance %s of type %s, which had no capacity", in.ID, in.Type)
		}
	}
	for intent, n := range perIntent {
		if n > 1 {
			t.Errorf("intent %s has %d instances", intent, n)
		}
	}
	throttled, capacity := 0, 0
	for k, n := range srv.Errors() {
		switch {
		case strings.HasSuffix(k, "/RequestLimitExceeded"):
			throttled += n
		case strings.HasSuffix(k, "/InsufficientInstanceCapacity"):
			capacity += n
		}
	}
	if throttled == 0 || capacity == 0 {
		t.Errorf("the test server answered %d throttling and %d capacity errors: the test proves nothing", throttled, capacity)
	}
	t.Logf("served 12 leases through %d throttling and %d capacity errors; calls %v", throttled, capacity, srv.Calls())
}
