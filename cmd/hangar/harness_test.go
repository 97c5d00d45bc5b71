package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
	"github.com/hangar-ci/hangar/cloud/local"
	"github.com/hangar-ci/hangar/configs"
	"github.com/hangar-ci/hangar/internal/testutil"
	"github.com/hangar-ci/hangar/pool"
	"github.com/hangar-ci/hangar/pool/api"
)

// fakeClock is a clock tests move by hand; the server's timers, tickers
// and long polls follow it.
type fakeClock = testutil.FakeClock

func newFakeClock() *fakeClock { return testutil.NewFakeClockAt(time.Now()) }

// syncBuffer collects a server's log so tests can look for secrets in it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// workerCommand records the worker's assignment where the test can read it,
// then holds the lease like a real worker would.
const workerCommand = `env | grep '^HANGAR_WORKER_\|^HANGAR_LEASE_ID' | sort > "$HOME/worker.env"; exec sleep 600`

// testTOML is a config for one local pool of at most 3 instances; extra is
// appended to the pool's table.
func testTOML(dataDir, pool, extra string) string {
	if !strings.Contains(extra, "max_instances") {
		extra = "max_instances = 3\n" + extra
	}
	return fmt.Sprintf(`
[server]
listen = "127.0.0.1:0"
data_dir = %q
reconcile_interval = "1s"

[providers.local]
type = "local"

[pools.%s]
provider = "local"
idle_ttd = "5m"
boot_timeout = "2m"
worker_command = %q
%s
`, dataDir, pool, workerCommand, extra)
}

type testServer struct {
	*server
	client  *api.Client
	logs    *syncBuffer
	dataDir string
}

// startTest serves cfgText. The server's instances are terminated when the
// test ends, and the test fails if any of their processes survive.
func startTest(t testing.TB, cfgText string, clock pool.Clock) *testServer {
	t.Helper()
	return startTestWith(t, cfgText, serveOptions{Clock: clock})
}

// startTestWith is startTest with any serve options; the logger and tick
// are the harness's own.
func startTestWith(t testing.TB, cfgText string, o serveOptions) *testServer {
	t.Helper()
	cfg, err := configs.Parse(filepath.Join(t.TempDir(), "hangar.toml"), []byte(cfgText))
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	o.Logger, o.Tick = log, 20*time.Millisecond
	s, err := startServer(context.Background(), cfg, o)
	if err != nil {
		t.Fatalf("starting server: %v", err)
	}
	ts := &testServer{server: s, client: &api.Client{BaseURL: s.url}, logs: logs, dataDir: s.cfg.Server.DataDir}
	t.Cleanup(func() {
		_ = s.Close() // a test may have closed it already
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
			consoles, _ := filepath.Glob(filepath.Join(ts.dataDir, "local", "instances", "*", "console.log"))
			for _, c := range consoles {
				b, _ := os.ReadFile(c)
				t.Logf("%s:\n%s", c, b)
			}
		}
		terminateAll(t, filepath.Join(ts.dataDir, "local"))
	})
	return ts
}

// terminateAll ends every instance of the local cloud under dir and checks
// that no process of any of them survives.
func terminateAll(t testing.TB, dir string) {
	t.Helper()
	if _, err := os.Stat(dir); err != nil {
		return
	}
	p, err := local.New(context.Background(), local.Options{Dir: dir})
	if err != nil {
		t.Errorf("reopening local cloud for clean-up: %v", err)
		return
	}
	defer func() { _ = p.Close() }()
	list, err := p.List(context.Background(), nil)
	if err != nil {
		t.Errorf("listing for clean-up: %v", err)
		return
	}
	var ids []string
	for _, in := range list {
		ids = append(ids, in.ID)
	}
	if _, err := p.Terminate(context.Background(), ids); err != nil {
		t.Errorf("terminating for clean-up: %v", err)
	}
	for _, id := range ids {
		if pids := instanceProcs(id); len(pids) > 0 {
			t.Errorf("instance %s: processes %v survived terminate", id, pids)
		}
	}
}

// instanceProcs finds live processes that carry the local cloud's marker of
// instance id in their environment.
func instanceProcs(id string) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil {
			continue
		}
		if bytes.Contains(env, []byte("HANGAR_LOCAL_INSTANCE_ID="+id+"\x00")) {
			out = append(out, e.Name())
		}
	}
	return out
}

func (ts *testServer) instances(t *testing.T, poolName string) []pool.InstanceView {
	t.Helper()
	list, err := ts.client.Instances(t.Context(), poolName)
	if err != nil {
		t.Fatalf("listing instances: %v", err)
	}
	return list
}

func (ts *testServer) countState(t *testing.T, poolName string, st pool.State) int {
	n := 0
	for _, in := range ts.instances(t, poolName) {
		if in.State == st {
			n++
		}
	}
	return n
}

// workerEnv reads what the worker of instance id was started with.
func (ts *testServer) workerEnv(t *testing.T, id string) map[string]string {
	t.Helper()
	return readWorkerEnv(t, filepath.Join(ts.dataDir, "local"), id)
}

// readWorkerEnv waits for the worker of instance id, on the local cloud
// under dir, to have written its environment, and returns it.
func readWorkerEnv(t *testing.T, dir, id string) map[string]string {
	t.Helper()
	path := filepath.Join(dir, "instances", id, "disk", "worker.env")
	var data []byte
	testutil.Eventually(t, "the worker to start on "+id, 30*time.Second, func() bool {
		var err error
		data, err = os.ReadFile(path)
		return err == nil && len(data) > 0
	})
	env := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		k, v, _ := strings.Cut(line, "=")
		env[k] = v
	}
	return env
}

func (ts *testServer) lease(t *testing.T, req api.LeaseRequest) pool.LeaseView {
	t.Helper()
	if req.Wait == "" {
		req.Wait = "60s"
	}
	v, err := ts.client.Lease(t.Context(), req)
	if err != nil {
		t.Fatalf("lease: %v", err)
	}
	if v.State != pool.LeaseActive {
		t.Fatalf("lease %s is %s, want active", v.ID, v.State)
	}
	return v
}

func (ts *testServer) localProvider(t *testing.T) cloud.Provider {
	t.Helper()
	return ts.providers["local"]
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
